"""Attention cores for consistent self-attention: own tokens plus tokens appended from other images.

Two interchangeable paths for batch mode (see docs/methods/consistent.md for the measurement that picked
the default):

* ``concat``: gather the sampled tokens of every image of a CFG chunk into one pool, append the pool to each
  image's own keys/values, and mask the image's own pool entries (they duplicate its own tokens). One fused
  SDPA call; extra memory ~ batch x pool x D.
* ``layout``: the whole chunk as one sequence through ``visattn.kernels.block_sparse_attention`` with a
  :class:`BlockLayout` (own image, plus shared keys of the others); keys are permuted so that shared
  tokens form contiguous FULL blocks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..geometry import TokenGeometry

__all__ = ["plain_attention", "pool_indices", "concat_batch_attention", "layout_batch_attention",
           "appended_attention"]


def plain_attention(q, k, v, scale, attn_mask=None) -> torch.Tensor:
    """Exactly what the untouched model computes (the ``Dense`` method's call)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def pool_indices(sel: torch.Tensor, geometry: TokenGeometry) -> Tuple[torch.Tensor, torch.Tensor]:
    """From the (n, num_grid) sample: (owner image (M,), flat position in the chunk's n*N sequence (M,))."""
    img, tok = sel.nonzero(as_tuple=True)
    return img, img * geometry.seq_len + geometry.num_prefix + tok


def _chunked(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """(C*n, H, N, D) -> (C, H, n*N, D): each CFG chunk's images as one sequence."""
    B, H, N, D = x.shape
    n = B // chunks
    return x.view(chunks, n, H, N, D).transpose(1, 2).reshape(chunks, H, n * N, D)


def gather_pool(k: torch.Tensor, v: torch.Tensor, flat: torch.Tensor, chunks: int):
    """Sampled keys/values of each chunk: (C, H_kv, M, D) each."""
    return _chunked(k, chunks).index_select(2, flat), _chunked(v, chunks).index_select(2, flat)


def concat_batch_attention(q, k, v, pool_k, pool_v, owner: torch.Tensor, chunks: int, scale) -> torch.Tensor:
    """Image i attends to its own N tokens plus the pool minus its own pool entries (one masked SDPA)."""
    B, Hk, N, D = k.shape
    n = B // chunks
    M = owner.numel()
    ek = torch.cat([k.view(chunks, n, Hk, N, D), pool_k[:, None].expand(chunks, n, Hk, M, D)], 3)
    ev = torch.cat([v.view(chunks, n, Hk, N, D), pool_v[:, None].expand(chunks, n, Hk, M, D)], 3)
    keep = torch.cat([torch.ones(n, N, dtype=torch.bool, device=q.device),
                      owner[None, :] != torch.arange(n, device=q.device)[:, None]], 1)
    mask = keep[None].expand(chunks, n, N + M).reshape(B, 1, 1, N + M)
    return F.scaled_dot_product_attention(q, ek.reshape(B, Hk, N + M, D), ev.reshape(B, Hk, N + M, D),
                                          attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != Hk)


def build_layout(n: int, N: int, flat: torch.Tensor, device, block_size: int = 128):
    """BlockLayout over one chunk (n*N queries and keys): same image, or a shared key of another image."""
    from ..kernels import BlockLayout

    L = n * N
    shared = torch.zeros(L, dtype=torch.bool, device=device)
    shared[flat] = True
    img_of = torch.arange(L, device=device) // N

    def mask_mod(b, h, qi, ki):
        return (img_of[qi] == img_of[ki]) | shared[ki]

    # kernel order of keys: per image, shared tokens first, then the rest -> contiguous FULL blocks
    order = img_of * 2 + (~shared).long()
    perm_k = torch.argsort(order, stable=True)
    return BlockLayout.from_mask_mod(mask_mod, batch=None, heads=None, seq_lens=(L, L),
                                     block_size=block_size, device=device, perm_k=perm_k)


def layout_batch_attention(q, k, v, layout, chunks: int, scale, backend: str = "auto") -> torch.Tensor:
    """Batch-mode attention through the block-sparse dispatcher (same result as the concat path)."""
    from ..kernels import block_sparse_attention

    B, H, N, D = q.shape
    n = B // chunks
    out = block_sparse_attention(_chunked(q, chunks), _chunked(k, chunks), _chunked(v, chunks), layout,
                                 scale=scale, backend=backend)
    return out.view(chunks, H, n, N, D).transpose(1, 2).reshape(B, H, N, D)


def appended_attention(q, k, v, extra_k: torch.Tensor, extra_v: torch.Tensor, chunks: int, scale,
                       attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every image of chunk c attends to its own tokens plus ``extra_k[c]`` (C, H_kv, M, D); no mask needed."""
    B, Hk, N, D = k.shape
    n = B // chunks
    M = extra_k.shape[2]
    ek = torch.cat([k.view(chunks, n, Hk, N, D), extra_k[:, None].expand(chunks, n, Hk, M, D)], 3)
    ev = torch.cat([v.view(chunks, n, Hk, N, D), extra_v[:, None].expand(chunks, n, Hk, M, D)], 3)
    return F.scaled_dot_product_attention(q, ek.reshape(B, Hk, N + M, D), ev.reshape(B, Hk, N + M, D),
                                          scale=scale, enable_gqa=q.shape[1] != Hk)
