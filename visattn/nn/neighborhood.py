"""`NeighborhoodAttention1D/2D/3D`: neighborhood-attention layers with their own projections.

Same constructor and parameter names as NATTEN's modules (``qkv``: C -> 3C, ``proj``: C -> C); input and
output are channels-last ``(B, *spatial, C)``. The token permutation of the block-sparse layout is applied
once to ``x`` before the qkv projection (per-token ops commute with it) and undone once on the attention
output, fused with the heads transpose, so q/k/v need no separate gathers.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.dispatch import block_sparse_attention
from ..kernels.gather import permute_tokens
from ..methods._na_layout import auto_block_size, get_layout
from ..methods.neighborhood import BoolOrTuple, IntOrTuple, _per_axis, make_spec

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttentionND(nn.Module):
    """Generic N-d neighborhood attention layer (see the 1D/2D/3D subclasses)."""

    na_dim: int = 0

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, proj_drop: float = 0.0, backend: str = "auto",
                 block_size: Optional[Union[int, Tuple[int, int]]] = None, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        nd = self.na_dim
        self.kernel_size = _per_axis(kernel_size, nd, "kernel_size")
        self.stride = _per_axis(stride, nd, "stride")
        self.dilation = _per_axis(dilation, nd, "dilation")
        self.is_causal = _per_axis(is_causal, nd, "is_causal", bool)
        # validate everything that does not depend on the input extent now (extent is checked per call)
        make_spec(tuple(k * d for k, d in zip(self.kernel_size, self.dilation)), self.kernel_size,
                  self.dilation, self.stride, self.is_causal)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.backend, self.block_size = backend, block_size
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(embed_dim, embed_dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, *spatial, C) -> (B, *spatial, C)."""
        if x.dim() != self.na_dim + 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{type(self).__name__} expects (B, {', '.join('XYZ'[:self.na_dim])}, "
                             f"{self.embed_dim}), got {tuple(x.shape)}")
        B, *spatial, C = x.shape
        spec = make_spec(tuple(spatial), self.kernel_size, self.dilation, self.stride, self.is_causal)
        N, H, Dh = spec.num_spatial, self.num_heads, self.head_dim
        x = x.reshape(B, N, C)
        inv = None
        if spec.is_dense and self.backend == "auto":
            qkv = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(*qkv.unbind(0), scale=self.scale)
        else:
            bs = self.block_size or auto_block_size(spec, x.device, Dh)
            bs = (bs, bs) if isinstance(bs, int) else tuple(bs)
            permuted = get_layout(spec, bs, x.device)
            layout = get_layout(spec, bs, x.device, kernel_order=True)
            inv = permuted.inv_perm_q
            if permuted.perm_q is not None:  # None: the tiled order is the original one
                x = permute_tokens(x.unsqueeze(1), permuted.perm_q, inv).squeeze(1)
            qkv = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
            out = block_sparse_attention(*qkv.unbind(0), layout, scale=self.scale, backend=self.backend)
        if inv is not None:  # back to the original order, into (B, N, H, Dh) memory in the same copy
            out = permute_tokens(out, inv, permuted.perm_q, heads_last=True)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)).reshape(B, *spatial, C)


class NeighborhoodAttention1D(_NeighborhoodAttentionND):
    """1-D neighborhood attention on (B, L, C)."""

    na_dim = 1


class NeighborhoodAttention2D(_NeighborhoodAttentionND):
    """2-D neighborhood attention on (B, H, W, C)."""

    na_dim = 2


class NeighborhoodAttention3D(_NeighborhoodAttentionND):
    """3-D neighborhood attention on (B, T, H, W, C)."""

    na_dim = 3
