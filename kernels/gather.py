"""Token gathers for layout permutations: ``y[:, :, i] = x[:, :, idx[i]]`` on (B, H, N, D) views, one Triton
copy at memory bandwidth (``torch.index_select`` along dim 2 runs at about a fifth of it on the H100).

The output can be heads-first or heads-last memory (a (B, N, H, D) buffer seen as (B, H, N, D)), so a
permutation and the heads transpose are one copy. :func:`permute_tokens` is differentiable when given the
inverse permutation (the gradient of a gather by a bijection is the gather by its inverse).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["gather_tokens", "permute_tokens"]

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

_ROWS = 64  # tokens per program
# below this many bytes moved, index_select's cheaper launch wins (H100: the Triton copy moves 2.8 TB/s vs
# 1.25 TB/s, but its launch costs ~40 us more host time; benchmarks/results/gather_probe_h100.json)
MIN_TRITON_BYTES = 64 << 20

if triton is not None:

    @triton.jit
    def _gather_kernel(X, IDX, Y, N, H, sxb, sxh, sxn, sxd, syb, syh, syn, syd,
                       D: tl.constexpr, D_BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rmask = rows < N
        src = tl.load(IDX + rows, mask=rmask, other=0).to(tl.int64)
        xrow = X + b * sxb + h * sxh + src[:, None] * sxn
        yrow = Y + b * syb + h * syh + rows[:, None].to(tl.int64) * syn
        for d0 in tl.static_range(0, D, D_BLOCK):  # wide rows (nn modules gather whole embeddings) in chunks
            d = d0 + tl.arange(0, D_BLOCK)
            m = rmask[:, None] & (d < D)[None, :]
            tl.store(yrow + d[None, :] * syd, tl.load(xrow + d[None, :] * sxd, mask=m), mask=m)


def _empty_out(x: torch.Tensor, n: int, heads_last: bool) -> torch.Tensor:
    B, H, _, D = x.shape
    if heads_last:
        return torch.empty(B, n, H, D, device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty(B, H, n, D, device=x.device, dtype=x.dtype)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, heads_last: bool = False) -> torch.Tensor:
    """``x[:, :, idx]`` for ``x`` (B, H, N, D) and int ``idx`` (M,) with entries in [0, N); the result is
    (B, H, M, D), in (B, M, H, D) memory when ``heads_last``. Triton on CUDA for copies of at least
    ``MIN_TRITON_BYTES``, ``index_select`` otherwise."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D), got shape {tuple(x.shape)}")
    if idx.dim() != 1:
        raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
    moved = 2 * idx.numel() * x.shape[0] * x.shape[1] * x.shape[3] * x.element_size()
    if triton is None or not x.is_cuda or x.numel() == 0 or idx.numel() == 0 or moved < MIN_TRITON_BYTES:
        idx = idx.to(device=x.device, dtype=torch.long)
        if heads_last:
            return x.transpose(1, 2).index_select(1, idx).transpose(1, 2)
        return x.index_select(2, idx)
    return _triton_gather(x, idx, _empty_out(x, idx.numel(), heads_last))


def _triton_gather(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The Triton copy into ``out`` (B, H, M, D), any strides (CPU tensors under ``TRITON_INTERPRET=1``)."""
    idx32 = idx if idx.dtype == torch.int32 else idx.to(torch.int32)
    B, H, _, D = x.shape
    grid = (triton.cdiv(idx.numel(), _ROWS), B * H)
    _gather_kernel[grid](x, idx32, out, idx.numel(), H, *x.stride(), *out.stride(),
                         D=D, D_BLOCK=min(triton.next_power_of_2(D), 128), ROWS=_ROWS, num_warps=4)
    return out


class _PermuteTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inv, heads_last):  # type: ignore[override]
        ctx.save_for_backward(inv)
        return gather_tokens(x, perm, heads_last=heads_last)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return gather_tokens(g, inv), None, None, None


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, inv: Optional[torch.Tensor] = None, *,
                   heads_last: bool = False) -> torch.Tensor:
    """``x[:, :, perm]`` for a permutation ``perm`` of the N tokens; differentiable when ``inv`` (its inverse)
    is given, else plain ``index_select`` under autograd."""
    if torch.is_grad_enabled() and x.requires_grad:
        if inv is None:
            out = x.index_select(2, perm)
            return out.transpose(1, 2).contiguous().transpose(1, 2) if heads_last else out
        return _PermuteTokens.apply(x, perm, inv, heads_last)
    return gather_tokens(x, perm, heads_last=heads_last)
