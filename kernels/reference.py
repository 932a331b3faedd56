"""Exact dense references: masked softmax attention in plain torch (the ``sdpa`` backend and test oracle)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["masked_attention", "expand_kv_heads"]


def expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Repeat key/value heads for grouped-query attention (H_q must be a multiple of H_kv)."""
    hq, hk = q.shape[1], k.shape[1]
    if hq == hk:
        return k, v
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    return k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                     scale: Optional[float] = None, return_lse: bool = False, compute_dtype=None):
    """softmax(q k^T * scale, masked) v for (B, H, N, D) tensors; fully masked rows give 0 (LSE = -inf).

    ``mask`` is a bool tensor broadcastable to (B, H, Nq, Nk), True = keep. Computes in ``compute_dtype``
    (default: float64 for float64 inputs, else float32) and returns the input dtype. Differentiable.
    """
    k, v = expand_kv_heads(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cd = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe.unsqueeze(-1))  # exp(-inf) = 0 on masked entries and empty rows
    out = torch.matmul(p, v.to(cd)).to(q.dtype)
    return (out, lse.float()) if return_lse else out
