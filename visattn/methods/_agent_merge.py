"""Fused ToMe merge for AgentSD on CUDA (Triton): one pass over q/k/v instead of upcast-concat + index_add + div.

In the merged sequence ``[unmerged src | dst]`` every unmerged src token is a group of one, so its merged row is
an exact copy; only the dst groups need a mean. Two kernels:

1. ``_scatter``: every source token reads its row of each input once; an unmerged token stores it directly in the
   output (input dtype, exact); a token of a dst group adds it in fp32 (atomics) to a small (B * num_dst, C + 1)
   buffer, whose last column counts the group. That buffer is ~2-8 MB at 1024 px, so the atomics stay in L2.
2. ``_finalize``: dst rows = buffer / count, cast to the input dtype.

Same result as :meth:`BipartiteGraph.merge_tokens`' torch path up to the order of the fp32 sums (both use
atomics on a GPU). Used on CUDA when Triton imports; the torch path everywhere else (and under autograd).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

__all__ = ["fused_merge", "available"]

_ERR: Optional[str] = None
try:
    import triton
    import triton.language as tl
except Exception as e:  # pragma: no cover - triton is optional
    triton = tl = None
    _ERR = f"{type(e).__name__}: {e}"

MAX_INPUTS = 3


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def os_interpret() -> bool:
    """Whether the Triton interpreter is on (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the fused merge runs for tensors like ``x``: CUDA, Triton importable, a 16/32-bit float dtype."""
    return triton is not None and x.is_cuda and x.dtype in _DTYPES


if triton is not None:
    @triton.jit
    def _scatter_one(X, sxb, sxn, C, OUT, ACC, rows, b, i, slot_loc, is_unm, dst_row, tmask, col0,
                     LD_OUT: tl.constexpr, LD_ACC: tl.constexpr, BLOCK_C: tl.constexpr):
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            cm = cols < C
            m = tmask[:, None] & cm[None, :]
            x = tl.load(X + b[:, None] * sxb + i[:, None] * sxn + cols[None, :], mask=m, other=0.0)
            tl.store(OUT + rows[:, None] * LD_OUT + col0 + cols[None, :], x, mask=m & is_unm[:, None])
            tl.atomic_add(ACC + dst_row[:, None] * LD_ACC + col0 + cols[None, :], x.to(tl.float32),
                          mask=m & (~is_unm)[:, None], sem="relaxed")

    @triton.jit
    def _scatter(X0, s0b, s0n, C0, X1, s1b, s1n, C1, X2, s2b, s2n, C2, INV, OUT, ACC,
                 total, N, n_out, n_unm, nd,
                 NIN: tl.constexpr, LD_OUT: tl.constexpr, LD_ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        t = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        tmask = t < total
        b = t // N
        i = t - b * N
        slot = tl.load(INV + t, mask=tmask, other=0)
        slot_loc = slot - b * n_out
        is_unm = slot_loc < n_unm
        dst_row = b * nd + (slot_loc - n_unm)
        dst_row = tl.where(is_unm, 0, dst_row)
        rows = tl.where(is_unm, slot, 0)
        _scatter_one(X0, s0b, s0n, C0, OUT, ACC, rows, b, i, slot_loc, is_unm, dst_row, tmask, 0,
                     LD_OUT, LD_ACC, BLOCK_C)
        if NIN > 1:
            _scatter_one(X1, s1b, s1n, C1, OUT, ACC, rows, b, i, slot_loc, is_unm, dst_row, tmask, C0,
                         LD_OUT, LD_ACC, BLOCK_C)
        if NIN > 2:
            _scatter_one(X2, s2b, s2n, C2, OUT, ACC, rows, b, i, slot_loc, is_unm, dst_row, tmask, C0 + C1,
                         LD_OUT, LD_ACC, BLOCK_C)
        # group sizes in the last accumulator column
        ones = tl.full((BLOCK_T,), 1.0, tl.float32)
        tl.atomic_add(ACC + dst_row * LD_ACC + (LD_ACC - 1), ones, mask=tmask & (~is_unm), sem="relaxed")

    @triton.jit
    def _finalize(ACC, OUT, n_out, n_unm, nd, total_rows, TOT,
                  LD_OUT: tl.constexpr, LD_ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rm = r < total_rows
        b = r // nd
        j = r - b * nd
        cnt = tl.load(ACC + r * LD_ACC + (LD_ACC - 1), mask=rm, other=1.0)
        inv_cnt = 1.0 / tl.maximum(cnt, 1.0)
        orow = b * n_out + n_unm + j
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, TOT, BLOCK_C):
            cols = c0 + offs_c
            m = rm[:, None] & (cols < TOT)[None, :]
            a = tl.load(ACC + r[:, None] * LD_ACC + cols[None, :], mask=m, other=0.0)
            tl.store(OUT + orow[:, None] * LD_OUT + cols[None, :], (a * inv_cnt[:, None]).to(OUT.dtype.element_ty),
                     mask=m)


def fused_merge(xs: Sequence[torch.Tensor], inv: torch.Tensor, n_out: int, n_unm: int, nd: int) -> List[torch.Tensor]:
    """Merge (B, N, C_i) tensors (unit stride on C) with the flat slot index ``inv`` (B*N,) into (B, n_out, C_i)
    views of one (B, n_out, sum C_i) buffer; merged layout ``[n_unm unmerged | nd dst]`` per batch element."""
    if not 1 <= len(xs) <= MAX_INPUTS:
        raise ValueError(f"fused_merge takes 1 to {MAX_INPUTS} tensors, got {len(xs)}")
    b, n, _ = xs[0].shape
    dtype, dev = xs[0].dtype, xs[0].device
    xs = [x if x.stride(2) == 1 else x.contiguous() for x in xs]
    widths = [x.shape[2] for x in xs]
    tot = sum(widths)
    out = torch.empty(b * n_out, tot, dtype=dtype, device=dev)
    acc = torch.zeros(max(b * nd, 1), tot + 1, dtype=torch.float32, device=dev)
    args = []
    for j in range(MAX_INPUTS):
        x = xs[min(j, len(xs) - 1)]
        args += [x, x.stride(0), x.stride(1), x.shape[2] if j < len(xs) else 0]
    total = b * n
    block_t = 32
    _scatter[(triton.cdiv(total, block_t),)](*args, inv, out, acc, total, n, n_out, n_unm, nd,
                                             NIN=len(xs), LD_OUT=tot, LD_ACC=tot + 1, BLOCK_T=block_t,
                                             BLOCK_C=64, num_warps=4)
    if nd:
        rows = b * nd
        _finalize[(triton.cdiv(rows, 16),)](acc, out, n_out, n_unm, nd, rows, tot, LD_OUT=tot, LD_ACC=tot + 1,
                                            BLOCK_R=16, BLOCK_C=64, num_warps=4)
    out = out.view(b, n_out, tot)
    return list(out.split(widths, dim=2))
