"""`AgentAttention`: the trainable agent-attention module of Agent-DeiT / Agent-PVT (Han et al., ECCV 2024).

Written from the paper and the official module's documented behaviour (LeapLabTHU/Agent-Attention,
``agent_transformer/models/agent_deit.py`` / ``agent_pvt.py``); parameter names and shapes follow the official
modules so their checkpoints load with ``strict=True``:

- DeiT layout (``fused_qkv=True``, ``num_prefix_tokens=1``): ``qkv``, ``proj``, ``dwc``, ``an_bias``, ``na_bias``,
  ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``, ``ac_bias``, ``ca_bias``.
- PVT layout (``fused_qkv=False``, ``num_prefix_tokens=0``): ``q``, ``kv``, ``proj``, ``dwc``, the six grid
  biases, and ``sr`` + ``norm`` when ``sr_ratio > 1``.

Computation, per head (``s = head_dim ** -0.5``, agents A = queries average-pooled to a sqrt(n) x sqrt(n) grid)::

    V_A = softmax(A K^T s + B1) V          B1: agent->key bias  (an_bias resized to the key grid + ah + aw [+ ac])
    O   = softmax(Q A^T s + B2) V_A        B2: query->agent bias (na_bias resized to the query grid + ha + wa [+ ca])
    O[grid] += DWC(V as an image)          3x3 depthwise conv (upsampled from the reduced grid when sr_ratio > 1)
    out = proj(O)

At the training grid (``window``) this is the official computation; at other grids the biases are resized
(bilinear / linear), the fix the authors recommend for other resolutions.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AgentAttention"]


def _resize_axis(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Linearly resize ``t`` along ``dim`` to ``size`` (identity when the size already matches)."""
    if t.shape[dim] == size:
        return t
    moved = t.movedim(dim, -1)
    shape = moved.shape
    out = F.interpolate(moved.reshape(-1, 1, shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*shape[:-1], size).movedim(-1, dim)


class AgentAttention(nn.Module):
    """Agent attention with position biases and a depthwise-conv term (see module doc).

    Args:
        dim: channels; ``num_heads`` heads of ``dim // num_heads``.
        qkv_bias: bias on the q/k/v projections. ``proj_bias``: bias on the output projection.
        agent_num: number of agents n (a perfect square: agents are queries pooled to sqrt(n) x sqrt(n)).
        window: training token grid (int or (h, w)); fixes the bias shapes (official ``window`` / PVT grid).
        num_prefix_tokens: class/register tokens before the grid (DeiT 1, PVT 0); they get the ``ac``/``ca``
            biases, are keys for the agents and read the agents like the grid queries, but get no DWC term.
        sr_ratio: PVT spatial reduction of keys/values (``sr`` conv + ``norm``); 1 = none.
        fused_qkv: one ``qkv`` Linear (DeiT/timm) or ``q`` + ``kv`` (PVT).
        qk_scale: override of the softmax scale (PVT argument); default ``head_dim ** -0.5``.

    ``forward(x, H=None, W=None)``: x (B, N, C); the grid (H, W) defaults to ``window`` when the token count
    fits it, else a square grid. ``attn_mask``/``is_causal`` (timm's Block passes them) must be None/False.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0., agent_num: int = 49, window: Union[int, Tuple[int, int]] = 14, *,
                 num_prefix_tokens: int = 1, sr_ratio: int = 1, fused_qkv: bool = True, proj_bias: bool = True,
                 qk_scale: Optional[float] = None, qk_norm: bool = False, scale_norm: bool = False,
                 device=None, dtype=None, **kwargs) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        pool = int(round(math.sqrt(agent_num))) if agent_num > 0 else 0
        if agent_num < 1 or pool * pool != agent_num:
            raise ValueError(f"agent_num must be a positive perfect square (agents pool to a square grid), "
                             f"got {agent_num}")
        win = (window, window) if isinstance(window, int) else tuple(window)
        if len(win) != 2 or min(win) < 1:
            raise ValueError(f"window must be a positive int or (h, w), got {window!r}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if sr_ratio < 1 or (sr_ratio > 1 and fused_qkv):
            raise ValueError(f"sr_ratio must be >= 1 and needs fused_qkv=False (PVT layout), got sr_ratio={sr_ratio}, "
                             f"fused_qkv={fused_qkv}")
        if qk_norm or scale_norm:
            raise ValueError("AgentAttention has no qk_norm / scale_norm (allowed: False)")
        fk = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.agent_num, self.pool_size, self.window = agent_num, (pool, pool), win
        self.num_prefix_tokens, self.sr_ratio, self.fused_qkv = num_prefix_tokens, sr_ratio, fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **fk)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **fk)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **fk)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **fk)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **fk)
            self.norm = nn.LayerNorm(dim, **fk)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **fk)
        h, n, (wh, ww) = num_heads, agent_num, win
        kh, kw = wh // sr_ratio, ww // sr_ratio
        self.an_bias = nn.Parameter(torch.zeros(h, n, 7, 7, **fk))
        self.na_bias = nn.Parameter(torch.zeros(h, n, 7, 7, **fk))
        self.ah_bias = nn.Parameter(torch.zeros(1, h, n, kh, 1, **fk))
        self.aw_bias = nn.Parameter(torch.zeros(1, h, n, 1, kw, **fk))
        self.ha_bias = nn.Parameter(torch.zeros(1, h, wh, 1, n, **fk))
        self.wa_bias = nn.Parameter(torch.zeros(1, h, 1, ww, n, **fk))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, h, n, num_prefix_tokens, **fk))
            self.ca_bias = nn.Parameter(torch.zeros(1, h, num_prefix_tokens, n, **fk))
        self.reset_agent_parameters()

    def bias_names(self) -> Tuple[str, ...]:
        """Names of the position-bias parameters."""
        names = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")
        return names + (("ac_bias", "ca_bias") if self.num_prefix_tokens else ())

    @torch.no_grad()
    def reset_agent_parameters(self, std: float = 0.02) -> None:
        """Official initialisation of the agent-specific parameters: biases ~ trunc_normal(std), default DWC."""
        for name in self.bias_names():
            nn.init.trunc_normal_(getattr(self, name), std=std)  # timm-style: cut at +-2 (absolute)
        self.dwc.reset_parameters()

    @torch.no_grad()
    def zero_agent_parameters(self) -> None:
        """Zero every bias and the DWC (conversion start: no position prior, no conv term)."""
        for name in self.bias_names():
            getattr(self, name).zero_()
        self.dwc.weight.zero_()
        if self.dwc.bias is not None:
            self.dwc.bias.zero_()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, window={self.window}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, sr_ratio={self.sr_ratio}")

    def _grid(self, n_grid: int, H: Optional[int], W: Optional[int]) -> Tuple[int, int]:
        if H is not None and W is not None:
            if H * W != n_grid:
                raise ValueError(f"H*W = {H}*{W} does not match the {n_grid} grid tokens")
            return H, W
        if n_grid == self.window[0] * self.window[1]:
            return self.window
        side = int(round(math.sqrt(n_grid)))
        if side * side != n_grid:
            raise ValueError(f"{n_grid} grid tokens are not the window {self.window} nor a square; pass H and W")
        return side, side

    def _biases(self, grid: Tuple[int, int], kv_grid: Tuple[int, int], dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """B1 (1, h, n, p + Nk) agent->key and B2 (1, h, p + N, n) query->agent."""
        h, n, p = self.num_heads, self.agent_num, self.num_prefix_tokens
        b1 = F.interpolate(self.an_bias, size=kv_grid, mode="bilinear", align_corners=False).reshape(1, h, n, -1)
        ah = _resize_axis(self.ah_bias, 3, kv_grid[0])
        aw = _resize_axis(self.aw_bias, 4, kv_grid[1])
        b1 = b1 + (ah + aw).reshape(1, h, n, -1)
        b2 = F.interpolate(self.na_bias, size=grid, mode="bilinear", align_corners=False).reshape(1, h, n, -1)
        b2 = b2.transpose(-1, -2)
        ha = _resize_axis(self.ha_bias, 2, grid[0])
        wa = _resize_axis(self.wa_bias, 3, grid[1])
        b2 = b2 + (ha + wa).reshape(1, h, -1, n)
        if p:
            b1 = torch.cat([self.ac_bias, b1], dim=-1)
            b2 = torch.cat([self.ca_bias, b2], dim=-2)
        return b1.to(dtype), b2.to(dtype)

    def forward(self, x: torch.Tensor, H: Optional[int] = None, W: Optional[int] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("AgentAttention does not support attn_mask / is_causal (allowed: None / False)")
        b, n_tok, c = x.shape
        if c != self.dim:
            raise ValueError(f"expected {self.dim} channels, got {c}")
        p, nh, hd = self.num_prefix_tokens, self.num_heads, self.head_dim
        grid = self._grid(n_tok - p, H, W)
        if self.fused_qkv:
            q, k, v = self.qkv(x).reshape(b, n_tok, 3, c).unbind(2)
            kv_grid = grid
        else:
            q = self.q(x)
            src = x
            kv_grid = grid
            if self.sr_ratio > 1:
                if p:
                    raise ValueError("sr_ratio > 1 supports no prefix tokens")
                img = x.transpose(1, 2).reshape(b, c, *grid)
                src = self.norm(self.sr(img).flatten(2).transpose(1, 2))
                kv_grid = (grid[0] // self.sr_ratio, grid[1] // self.sr_ratio)
            k, v = self.kv(src).reshape(b, src.shape[1], 2, c).unbind(2)
        q_img = q[:, p:].transpose(1, 2).reshape(b, c, *grid)
        agents = F.adaptive_avg_pool2d(q_img, self.pool_size).flatten(2).transpose(1, 2)     # (b, n, c)

        def heads(t):
            return t.reshape(b, t.shape[1], nh, hd).transpose(1, 2)

        qh, kh, vh, ah = heads(q), heads(k), heads(v), heads(agents)
        b1, b2 = self._biases(grid, kv_grid, x.dtype)
        drop = self.attn_drop.p if self.training else 0.0
        agent_v = F.scaled_dot_product_attention(ah, kh, vh, attn_mask=b1, dropout_p=drop, scale=self.scale)
        out = F.scaled_dot_product_attention(qh, ah, agent_v, attn_mask=b2, dropout_p=drop, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n_tok, c)
        v_img = v[:, p:].transpose(1, 2).reshape(b, c, *kv_grid)
        if kv_grid != grid:
            v_img = F.interpolate(v_img, size=grid, mode="bilinear", align_corners=False)
        conv = self.dwc(v_img).flatten(2).transpose(1, 2)
        out = torch.cat([out[:, :p], out[:, p:] + conv], dim=1) if p else out + conv
        return self.proj_drop(self.proj(out))
