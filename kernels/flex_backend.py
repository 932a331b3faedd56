"""Backend ``"flex"``: torch FlexAttention on the same :class:`BlockLayout` (for parity tests and benchmarks).

The layout's FULL lists become FlexAttention's ``full_kv_*`` lists and its PARTIAL lists the ``kv_*``
lists; the ``mask_mod`` reads the same bit-packed element masks from ``layout.mask_table`` (and answers
True on FULL blocks, False on EMPTY ones) so eager (CPU) and compiled (CUDA) FlexAttention compute the
same function as our kernel. On CUDA ``flex_attention`` is compiled once per process (torch.compile);
on CPU it runs eagerly and has no backward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .dispatch import Backend, register_backend
from .layout import BlockLayout

__all__ = ["to_flex_block_mask", "layout_mask_mod", "flex_block_sparse_attention"]

_COMPILED: Optional[Callable] = None


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except Exception as e:  # pragma: no cover - torch < 2.5
        raise RuntimeError(f"torch.nn.attention.flex_attention is not available ({e})") from e
    return fa


def _block_id_map(layout: BlockLayout) -> torch.Tensor:
    """int32 (Bl, Hl, nQB, nKB): -1 empty, -2 full, else the partial block's row in ``mask_table``."""
    if "flex_ids" in layout._cache:
        return layout._cache["flex_ids"]
    with torch.inference_mode(False):  # cached on the layout: must also serve later autograd calls
        return _build_block_id_map(layout)


def _build_block_id_map(layout: BlockLayout) -> torch.Tensor:
    cls_ = layout.block_classes()
    ids = torch.full(cls_.shape, -1, dtype=torch.int32, device=layout.device)
    ids[cls_ == 2] = -2
    valid = torch.arange(layout.partial_indices.shape[-1], device=layout.device) < layout.partial_counts.unsqueeze(-1)
    ent = valid.nonzero()
    if ent.numel():
        b, h, qb, slot = ent.unbind(1)
        ids[b, h, qb, layout.partial_indices[b, h, qb, slot].long()] = layout.partial_mask_ids[b, h, qb, slot]
    layout._cache["flex_ids"] = ids
    return ids


def layout_mask_mod(layout: BlockLayout) -> Callable:
    """Element predicate ``mask_mod(b, h, q_idx, kv_idx)`` in *kernel order* equal to ``layout.to_dense``."""
    ids = _block_id_map(layout)
    table = layout.mask_table
    bm, bn = layout.block_m, layout.block_n
    nqb, nkb = layout.num_q_blocks, layout.num_k_blocks
    nk = layout.seq_len_k
    bcast_b, bcast_h = layout.batch_dim == 1, layout.head_dim_ == 1

    def mask_mod(b, h, q_idx, kv_idx):
        bb = b * 0 if bcast_b else b
        hh = h * 0 if bcast_h else h
        qb = torch.clamp(q_idx // bm, max=nqb - 1)
        kb = torch.clamp(kv_idx // bn, max=nkb - 1)
        m = ids[bb, hh, qb, kb]
        col = kv_idx % bn
        word = table[torch.clamp(m, min=0), q_idx % bm, col // 32]
        bit = (word >> (col % 32)) & 1
        return ((m == -2) | ((m >= 0) & (bit == 1))) & (kv_idx < nk)

    return mask_mod


def to_flex_block_mask(layout: BlockLayout):
    """The layout as a torch FlexAttention ``BlockMask`` (kernel order; cached on the layout)."""
    if "flex_block_mask" in layout._cache:
        return layout._cache["flex_block_mask"]
    with torch.inference_mode(False):  # cached on the layout: must also serve later autograd calls
        return _build_flex_block_mask(layout)


def _build_flex_block_mask(layout: BlockLayout):
    fa = _flex_module()
    nkb = layout.num_k_blocks

    def pad(idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*idx.shape[:3], nkb, dtype=torch.int32, device=idx.device)
        w = min(idx.shape[-1], nkb)
        out[..., :w] = idx[..., :w]
        return out.contiguous()

    if layout.device.type == "cuda" and int(layout.partial_counts.sum()) == 0:
        # compiled flex never calls mask_mod on FULL blocks: share one function so that layouts of the
        # same shape reuse the compiled kernel (a per-layout closure would recompile each time)
        mask_mod = fa.noop_mask
    else:  # eager (CPU) flex applies mask_mod to every element: give the exact predicate
        mask_mod = layout_mask_mod(layout)
    args = dict(kv_num_blocks=layout.partial_counts.contiguous(), kv_indices=pad(layout.partial_indices),
                full_kv_num_blocks=layout.full_counts.contiguous(), full_kv_indices=pad(layout.full_indices),
                BLOCK_SIZE=(layout.block_m, layout.block_n), mask_mod=mask_mod)
    try:
        bm = fa.BlockMask.from_kv_blocks(**args, seq_lengths=(layout.seq_len_q, layout.seq_len_k))
    except TypeError:  # older torch without seq_lengths
        bm = fa.BlockMask.from_kv_blocks(**args)
    layout._cache["flex_block_mask"] = bm
    return bm


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_flex_module().flex_attention, dynamic=False)
    return _COMPILED


def flex_block_sparse_attention(q, k, v, layout: BlockLayout, scale: Optional[float] = None,
                                return_lse: bool = False):
    """Kernel-order attention through FlexAttention with ``to_flex_block_mask(layout)``."""
    fa = _flex_module()
    fn = _compiled_flex() if q.is_cuda else fa.flex_attention
    gqa = q.shape[1] != k.shape[1]
    bm = to_flex_block_mask(layout)
    opts = layout._cache.get("flex_kernel_options")
    try:
        res = fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, return_lse=return_lse, kernel_options=opts)
    except Exception as e:  # inductor may run out of shared memory with gather-heavy mask_mods: smaller tiles
        if not q.is_cuda or opts is not None or "resource" not in str(e):
            raise
        opts = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1, "num_warps": 4}
        layout._cache["flex_kernel_options"] = opts
        res = fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, return_lse=return_lse, kernel_options=opts)
    if return_lse:
        out, lse = res
        return out, lse.float()
    return res


def _probe(q: torch.Tensor, layout: BlockLayout, needs_grad: bool) -> Optional[str]:
    try:
        _flex_module()
    except RuntimeError as e:
        return str(e)
    if q.device.type == "cpu" and needs_grad:
        return "FlexAttention has no backward on CPU (run without grad, or use backend='sdpa')"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device.type!r} is not supported (allowed: cpu, cuda)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {q.dtype} is not supported (allowed: float16, bfloat16, float32, float64)"
    if q.shape[-1] < 16:
        return f"head dim {q.shape[-1]} is too small for FlexAttention (allowed: >= 16)"
    return None


def _backend_fn(q, k, v, layout, scale, return_lse):
    return flex_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse)


register_backend(Backend("flex", _backend_fn, _probe, handles_permutation=False))
