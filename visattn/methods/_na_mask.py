"""Neighborhood-attention element predicate with NATTEN's exact semantics.

Per spatial axis with extent ``L``, kernel ``k``, dilation ``d``, stride ``s`` and causal flag ``c``,
query coordinate ``q`` may attend key coordinate ``kv`` iff (AND over axes):

* same dilation group: ``kv % d == q % d``; group-local coordinates ``q' = q // d``, ``kv' = kv // d``,
  group length ``L_g = ceil((L - q % d) / d)``;
* non-causal: ``leader = min((q'//s)*s + s//2, L_g - 1)``, ``center = clamp(leader, k//2, L_g - 1 - right)``
  with ``right = k//2 + k%2 - 1``; allowed iff ``center - k//2 <= kv' <= center + right`` (the window
  shifts to stay inside the grid: every query sees exactly ``k`` keys per axis);
* causal: ``leader = min((q'//s)*s + s - 1, L_g - 1)``; allowed iff ``leader - k < kv' <= q'``.

Global (non-grid) tokens sit before (``prefix``) and after (``suffix``) the row-major grid tokens; they
attend to everything and every query attends to them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["NASpec", "axis_windows", "make_mask_mod"]


@dataclass(frozen=True)
class NASpec:
    """Normalised neighborhood-attention problem: per-axis tuples plus global token counts."""

    shape: Tuple[int, ...]
    kernel: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...]
    causal: Tuple[bool, ...]
    prefix: int = 0
    suffix: int = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_spatial(self) -> int:
        return math.prod(self.shape)

    @property
    def seq_len(self) -> int:
        return self.prefix + self.num_spatial + self.suffix

    @property
    def is_dense(self) -> bool:
        """True when every query sees every key (no causal axis, kernel == extent on every axis)."""
        return not any(self.causal) and all(k == L for k, L in zip(self.kernel, self.shape))

    def group_extents(self, axis: int) -> Tuple[int, ...]:
        """Group-local length of each dilation group along ``axis``."""
        L, d = self.shape[axis], self.dilation[axis]
        return tuple((L - g + d - 1) // d for g in range(d))


def axis_windows(L: int, k: int, d: int, s: int, causal: bool, device=None):
    """Per coordinate ``x`` in ``[0, L)``: ``(group, local, lo, hi)`` int64 tensors (L,).

    ``lo``/``hi`` bound the allowed keys in group-local coordinates (inclusive); a key ``kv`` is allowed
    iff ``group[kv] == group[x]`` and ``lo[x] <= local[kv] <= hi[x]``.
    """
    x = torch.arange(L, device=device, dtype=torch.int64)
    g = x % d
    xl = x // d
    lg = (L - g + d - 1) // d
    base = (xl // s) * s
    if causal:
        leader = torch.minimum(base + s - 1, lg - 1)
        lo = (leader - k + 1).clamp_min(0)
        hi = xl
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = torch.minimum(base + s // 2, lg - 1)
        center = torch.minimum(leader.clamp_min(left), lg - 1 - right)
        lo, hi = center - left, center + right
    return g, xl, lo, hi


def make_mask_mod(spec: NASpec, device=None):
    """``mask_mod(b, h, q_idx, kv_idx)`` over original sequence positions (broadcastable int64 tensors)."""
    tabs = [axis_windows(L, k, d, s, c, device)
            for L, k, d, s, c in zip(spec.shape, spec.kernel, spec.dilation, spec.stride, spec.causal)]
    strides = [math.prod(spec.shape[a + 1:]) for a in range(spec.ndim)]
    n, p = spec.num_spatial, spec.prefix
    has_global = spec.prefix + spec.suffix > 0

    def mask_mod(b, h, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        qg, kg = q_idx - p, kv_idx - p
        qc, kc = qg.clamp(0, n - 1), kg.clamp(0, n - 1)
        ok = None
        for (g, xl, lo, hi), st, L, d in zip(tabs, strides, spec.shape, spec.dilation):
            qa, ka = (qc // st) % L, (kc // st) % L
            kl = xl[ka]
            m = (kl >= lo[qa]) & (kl <= hi[qa])
            if d > 1:
                m = m & (g[ka] == g[qa])
            ok = m if ok is None else ok & m
        if has_global:
            ok = ok | (qg < 0) | (qg >= n) | (kg < 0) | (kg >= n)
        return ok

    return mask_mod
