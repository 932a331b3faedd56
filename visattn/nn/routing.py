"""`BiLevelRoutingAttention`: BiFormer's legacy BRA module (NHWC in/out) on visattn's gather-free core.

Parameter names match the released ``ops/bra_legacy.py::BiLevelRoutingAttention`` (``qkv.qkv``, ``wo``,
``lepe``), so the ``attn.*`` entries of BiFormer checkpoints load with ``strict=True``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.routing import bilevel_routing_attention, bilevel_routing_attention_gather

__all__ = ["BiLevelRoutingAttention"]


class QKVLinear(nn.Module):
    """One linear ``dim -> 2*qk_dim + dim``, split into q (qk_dim) and kv (qk_dim + dim) as in BiFormer."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x: torch.Tensor):
        q, kv = self.qkv(x).split([self.qk_dim, self.qk_dim + self.dim], dim=-1)
        return q, kv


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention with projections and LCE, x (N, H, W, C) -> (N, H, W, C).

    Same constructor as BiFormer's legacy module. Supported: ``kv_downsample_mode='identity'`` (every
    released model), ``param_attention`` 'qkvo' or 'qkv', ``param_routing=False``, ``soft_routing=False``
    (``diff_routing`` has no effect then: top-k indices carry no gradient). The token-to-token scale is
    ``qk_scale or qk_dim ** -0.5`` (the released quirk: the full qk_dim, not the head dim), also used for
    routing. ``auto_pad`` zero-pads *x* before the projection, so padded tokens carry the projection
    bias and are not masked, exactly as released. ``backend``: kernel backend of the gather-free path;
    ``implementation="gather"`` runs the released-style gather algorithm instead (for comparisons).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, kv_per_win: int = 4, kv_downsample_ratio: int = 4,
                 kv_downsample_kernel=None, kv_downsample_mode: str = "identity", topk: int = 4,
                 param_attention: str = "qkvo", param_routing: bool = False, diff_routing: bool = False,
                 soft_routing: bool = False, side_dwconv: int = 3, auto_pad: bool = False, *,
                 backend: str = "auto", implementation: str = "sparse") -> None:
        super().__init__()
        self.dim, self.n_win, self.num_heads = dim, n_win, num_heads
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim ({self.qk_dim}) and dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.scale = qk_scale or self.qk_dim ** -0.5
        if kv_downsample_mode != "identity":
            raise NotImplementedError(f"kv_downsample_mode={kv_downsample_mode!r}: only 'identity' (used by all "
                                      "released BiFormer models) is supported")
        if param_routing or soft_routing:
            raise NotImplementedError("param_routing / soft_routing are not supported (no released model uses them)")
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention must be 'qkvo' or 'qkv', got {param_attention!r}")
        if implementation not in ("sparse", "gather"):
            raise ValueError(f"implementation must be 'sparse' or 'gather', got {implementation!r}")
        self.topk, self.diff_routing, self.auto_pad = topk, diff_routing, auto_pad
        self.kv_downsample_mode, self.param_attention = kv_downsample_mode, param_attention
        self.side_dwconv = side_dwconv
        self.lepe = (nn.Conv2d(dim, dim, kernel_size=side_dwconv, stride=1, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        self.backend, self.implementation = backend, implementation

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, qk_dim={self.qk_dim}, "
                f"topk={self.topk}, side_dwconv={self.side_dwconv}, auto_pad={self.auto_pad}, "
                f"implementation={self.implementation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be NHWC (N, H, W, C), got shape {tuple(x.shape)}")
        n, h_in, w_in, c = x.shape
        s = self.n_win
        if self.auto_pad:
            x = F.pad(x, (0, 0, 0, (s - w_in % s) % s, 0, (s - h_in % s) % s))
        elif h_in % s or w_in % s:
            raise ValueError(f"H={h_in} and W={w_in} must be multiples of n_win={s} (or set auto_pad=True)")
        _, hp, wp, _ = x.shape
        q, kv = self.qkv(x)
        k, v = kv.split([self.qk_dim, self.dim], dim=-1)
        m = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (n, hp, wp, m*d) -> (n, m, hp*wp, d)
            return t.reshape(n, hp * wp, m, -1).transpose(1, 2)

        qh, kh, vh = heads(q), heads(k), heads(v)
        dq, dv = qh.shape[-1], vh.shape[-1]
        if dq < dv:  # zero channels leave q.k unchanged; the kernels need one head dim for q, k and v
            qh, kh = F.pad(qh, (0, dv - dq)), F.pad(kh, (0, dv - dq))
        elif dv < dq:
            vh = F.pad(vh, (0, dq - dv))
        if self.implementation == "gather":
            out = bilevel_routing_attention_gather(qh, kh, vh, spatial_shape=(hp, wp), num_regions=s, topk=self.topk,
                                                   scale=self.scale)
        else:
            out = bilevel_routing_attention(qh, kh, vh, spatial_shape=(hp, wp), num_regions=s, topk=self.topk,
                                            scale=self.scale, backend=self.backend)
        out = out[..., :dv].transpose(1, 2).reshape(n, hp, wp, self.dim)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        out = self.wo(out)
        if (hp, wp) != (h_in, w_in):
            out = out[:, :h_in, :w_in].contiguous()
        return out
