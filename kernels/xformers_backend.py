"""Backend ``"xformers"``: ``xformers.ops.memory_efficient_attention`` for the layouts it can express.

xformers has no general block-sparse mask, so this backend serves two layout kinds only:

* dense: every query row keeps every key (FULL blocks, plus the ragged last key block kept whole);
* block-diagonal: the layout is shared by batch and heads and its kept blocks form disjoint rectangles
  of consecutive query blocks x consecutive key blocks covering both sequences in order (Swin-style
  window attention after the window-major permutation), kept whole. Ran as ``BlockDiagonalMask``.

xformers is imported only when a call is probed (never at module import); if it is missing or broken the
probe says so and the dispatcher reports it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .dispatch import Backend, register_backend
from .layout import BlockLayout, unpack_bits

__all__ = ["xformers_plan", "xformers_available"]


def xformers_available() -> Optional[str]:
    """None when ``xformers.ops.memory_efficient_attention`` imports, else the reason."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:
        return f"xformers is not importable ({type(e).__name__}: {e})"
    return None


def _tail_is_keep_all(layout: BlockLayout) -> bool:
    """True when every PARTIAL block is the ragged last key block with all in-range keys kept."""
    if int(layout.partial_counts.sum()) == 0:
        return True
    nkb, bn, nk = layout.num_k_blocks, layout.block_n, layout.seq_len_k
    valid = torch.arange(layout.partial_indices.shape[-1], device=layout.device) < layout.partial_counts.unsqueeze(-1)
    if bool((layout.partial_indices[valid] != nkb - 1).any()):
        return False
    bits = unpack_bits(layout.mask_table[layout.partial_mask_ids[valid].long()], bn)  # (E, BM, BN)
    in_range = torch.arange(bn, device=layout.device) < nk - (nkb - 1) * bn
    return bool((bits == in_range).all())


def xformers_plan(layout: BlockLayout) -> Tuple[str, object]:
    """("dense", None) | ("blockdiag", (q_seqlens, kv_seqlens)) | ("none", reason); computed once per layout."""
    if "xformers_plan" not in layout._cache:
        layout._cache["xformers_plan"] = _plan(layout)
    return layout._cache["xformers_plan"]


def _plan(layout: BlockLayout) -> Tuple[str, object]:
    if not _tail_is_keep_all(layout):
        return "none", "the layout has PARTIAL blocks (element masks), which xformers cannot express"
    cls_ = layout.block_classes() > 0  # (Bl, Hl, nQB, nKB) kept blocks
    if bool(cls_.all()):
        return "dense", None
    if cls_.shape[0] != 1 or cls_.shape[1] != 1:
        return "none", "xformers block-diagonal needs one layout shared by batch and heads"
    m = cls_[0, 0].cpu()
    nqb, nkb = m.shape
    q_lens: List[int] = []
    kv_lens: List[int] = []
    qb = 0
    kb_next = 0
    while qb < nqb:
        row = m[qb].nonzero().flatten()
        if row.numel() == 0 or int(row[0]) != kb_next or int(row[-1]) - int(row[0]) + 1 != row.numel():
            return "none", "the kept blocks are not a block-diagonal of contiguous query/key block ranges"
        k0, k1 = int(row[0]), int(row[-1]) + 1
        q1 = qb
        while q1 < nqb and torch.equal(m[q1], m[qb]):
            q1 += 1
        if bool(m[q1:, k0:k1].any()) or bool(m[:qb, k0:k1].any()):
            return "none", "the kept blocks are not a block-diagonal of contiguous query/key block ranges"
        q_lens.append(min(q1 * layout.block_m, layout.seq_len_q) - qb * layout.block_m)
        kv_lens.append(min(k1 * layout.block_n, layout.seq_len_k) - k0 * layout.block_n)
        qb, kb_next = q1, k1
    if kb_next != nkb:
        return "none", "the block-diagonal does not cover every key block"
    return "blockdiag", (q_lens, kv_lens)


def _probe(q: torch.Tensor, layout: BlockLayout, needs_grad: bool) -> Optional[str]:
    why = xformers_available()
    if why is not None:
        return why
    if not q.is_cuda:
        return "the xformers backend runs on CUDA tensors only"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (allowed: float16, bfloat16, float32)"
    kind, why = xformers_plan(layout)
    return why if kind == "none" else None


def _backend_fn(q, k, v, layout, scale, return_lse):
    if return_lse:
        raise RuntimeError("the xformers backend does not return the log-sum-exp; use backend='triton'")
    import xformers.ops as xops
    from xformers.ops import fmha

    B, H, Nq, D = q.shape
    Hkv = k.shape[1]
    if Hkv != H:  # repeat kv heads (xformers' GQA layout is forward-only)
        k = k.repeat_interleave(H // Hkv, 1)
        v = v.repeat_interleave(H // Hkv, 1)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, N, H, D), heads-last
    kind, plan = xformers_plan(layout)
    if kind == "dense":
        out = xops.memory_efficient_attention(qt, kt, vt, scale=scale)
    else:
        q_lens, kv_lens = plan
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_lens * B, kv_lens * B)
        out = xops.memory_efficient_attention(qt.reshape(1, B * Nq, H, D), kt.reshape(1, -1, H, D),
                                              vt.reshape(1, -1, H, D), attn_bias=bias, scale=scale)
        out = out.reshape(B, Nq, H, D)
    return out.transpose(1, 2)


register_backend(Backend("xformers", _backend_fn, _probe, handles_permutation=False))
