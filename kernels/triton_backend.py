"""Triton block-sparse flash attention (forward + backward) over a :class:`BlockLayout`; backend ``"triton"``.

Forward (one program per (query block, batch*head); the query block index is the fastest grid axis so a
head's K/V stay in L2): the row's FULL key blocks are visited with no element test and no ``tl.where``,
then its PARTIAL blocks, whose bit-packed element masks are read from ``layout.mask_table``. Online
softmax in base 2 with the scale folded in (``exp2(s * scale * log2 e)``), fp32 accumulation, fp32
log-sum-exp out. Rows with no kept key give 0 and LSE ``-inf`` with no NaN.

Backward (deterministic, no atomics): one kernel per query block computes ``delta = rowsum(dO * O) - dLSE``
and dQ over the forward lists; one kernel per (key block, batch*kv_head) computes dK/dV over the
layout's transposed lists, summing the query heads of a GQA group in a fixed order.

Under ``TRITON_INTERPRET=1`` (CPU tests) dot operands are upcast to fp32, because the interpreter's bf16
``tl.dot`` is wrong; that flag must be set before this module is imported.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch

from .dispatch import Backend, register_backend
from .layout import BlockLayout

__all__ = ["triton_block_sparse_attention", "INTERPRET", "CONFIG_OVERRIDES", "kernel_config"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is optional at import time (probe explains)
    import triton
    import triton.language as tl

    _TRITON_ERR: Optional[str] = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERR = f"triton is not importable ({type(e).__name__}: {e})"

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (kernel, block_m, block_n, d_pad, dtype) -> (num_warps, num_stages). Filled by benchmarks/tuning; any key
# part may be None (wildcard). Lookups try exact keys first.
CONFIG_OVERRIDES: Dict[Tuple, Tuple[int, int]] = {}


def kernel_config(kernel: str, block_m: int, block_n: int, d_pad: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(num_warps, num_stages) for ``kernel`` in {"fwd", "bwd_dq", "bwd_dkdv"} (small table, measured on H100)."""
    for key in ((kernel, block_m, block_n, d_pad, dtype), (kernel, block_m, block_n, d_pad, None),
                (kernel, None, None, d_pad, None), (kernel, None, None, None, None)):
        if key in CONFIG_OVERRIDES:
            return CONFIG_OVERRIDES[key]
    tile = block_m * block_n
    if kernel == "fwd":
        warps = 8 if tile >= 128 * 128 else 4
        stages = 2 if d_pad >= 256 else 3
        if tile <= 64 * 64:
            stages = 3
        return warps, stages
    # backward kernels hold more live tiles: fewer stages
    warps = 8 if tile >= 128 * 64 else 4
    stages = 1 if d_pad >= 256 else 2
    return warps, stages


if triton is not None:

    @triton.jit
    def _load_bits(MT, mid, offs_m_loc, offs_n_loc, MASK_WORDS: tl.constexpr, BLOCK_M: tl.constexpr,
                   TRANSPOSED: tl.constexpr):
        """Unpack mask_table[mid] to a bool tile: (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) if TRANSPOSED."""
        base = MT + mid.to(tl.int64) * (BLOCK_M * MASK_WORDS)
        if TRANSPOSED:
            words = tl.load(base + offs_m_loc[None, :] * MASK_WORDS + (offs_n_loc[:, None] // 32))
            bits = (words >> (offs_n_loc[:, None] % 32)) & 1
        else:
            words = tl.load(base + offs_m_loc[:, None] * MASK_WORDS + (offs_n_loc[None, :] // 32))
            bits = (words >> (offs_n_loc[None, :] % 32)) & 1
        return bits != 0

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, skn, skd, svn, svd, IDX, MIDS, MT, cnt, Nk,
                   qk_scale, offs_m_loc, offs_n, offs_d, dmask, PARTIAL: tl.constexpr, EVEN_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_WORDS: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        for j in range(cnt):
            kb = tl.load(IDX + j)
            cols = kb * BLOCK_N + offs_n
            kp = K + k_base + cols[:, None] * skn + offs_d[None, :] * skd
            vp = V + v_base + cols[:, None] * svn + offs_d[None, :] * svd
            if PARTIAL:
                lm = (cols < Nk)[:, None] & dmask[None, :]
                k = tl.load(kp, mask=lm, other=0.0)
                v = tl.load(vp, mask=lm, other=0.0)
            elif EVEN_D:
                k = tl.load(kp)
                v = tl.load(vp)
            else:
                k = tl.load(kp, mask=dmask[None, :], other=0.0)
                v = tl.load(vp, mask=dmask[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if PARTIAL:
                keep = _load_bits(MT, tl.load(MIDS + j), offs_m_loc, offs_n, MASK_WORDS, BLOCK_M, False)
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = m_new
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                    FC, FI, PC, PI, PM, MT, lay_sb, lay_sh, F_W, P_W,
                    H, GROUP, Nq, Nk, qk_scale,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                    STORE_LSE: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
        offs_m_loc = tl.arange(0, BLOCK_M)
        offs_m = qb * BLOCK_M + offs_m_loc
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        mrow = offs_m < Nq
        q_base = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        q = tl.load(Q + q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=mrow[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        row = b * lay_sb + h * lay_sh + qb
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        fc = tl.load(FC + row)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, skn, skd, svn, svd,
                                   FI + row.to(tl.int64) * F_W, PM, MT, fc, Nk, qk_scale,
                                   offs_m_loc, offs_n, offs_d, dmask, False, EVEN_D, BLOCK_M, BLOCK_N,
                                   MASK_WORDS, UPCAST, DOT_PREC)
        pc = tl.load(PC + row)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, skn, skd, svn, svd,
                                   PI + row.to(tl.int64) * P_W, PM + row.to(tl.int64) * P_W, MT, pc, Nk,
                                   qk_scale, offs_m_loc, offs_n, offs_d, dmask, True, EVEN_D, BLOCK_M,
                                   BLOCK_N, MASK_WORDS, UPCAST, DOT_PREC)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        o_base = b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(O + o_base + offs_m[:, None] * son + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=mrow[:, None] & dmask[None, :])
        if STORE_LSE:
            lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
            tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse, mask=mrow)

    @triton.jit
    def _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, skn, skd, svn, svd, IDX, MIDS, MT, cnt,
                      Nk, qk_scale, offs_m_loc, offs_n, offs_d, dmask, PARTIAL: tl.constexpr,
                      EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        for j in range(cnt):
            kb = tl.load(IDX + j)
            cols = kb * BLOCK_N + offs_n
            kp = K + k_base + cols[:, None] * skn + offs_d[None, :] * skd
            vp = V + v_base + cols[:, None] * svn + offs_d[None, :] * svd
            if PARTIAL:
                lm = (cols < Nk)[:, None] & dmask[None, :]
                k = tl.load(kp, mask=lm, other=0.0)
                v = tl.load(vp, mask=lm, other=0.0)
            elif EVEN_D:
                k = tl.load(kp)
                v = tl.load(vp)
            else:
                k = tl.load(kp, mask=dmask[None, :], other=0.0)
                v = tl.load(vp, mask=dmask[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            p = tl.math.exp2(s * qk_scale - lse2[:, None])
            if PARTIAL:
                keep = _load_bits(MT, tl.load(MIDS + j), offs_m_loc, offs_n, MASK_WORDS, BLOCK_M, False)
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DLSE, DELTA,
                       sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                       sob, soh, son, sod, sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
                       FC, FI, PC, PI, PM, MT, lay_sb, lay_sh, F_W, P_W,
                       H, GROUP, Nq, Nk, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr,
                       DOT_PREC: tl.constexpr, HAS_DLSE: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
        offs_m_loc = tl.arange(0, BLOCK_M)
        offs_m = qb * BLOCK_M + offs_m_loc
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        mrow = offs_m < Nq
        lm = mrow[:, None] & dmask[None, :]
        bl = b.to(tl.int64)
        hl = h.to(tl.int64)
        q = tl.load(Q + bl * sqb + hl * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=lm, other=0.0)
        do = tl.load(DO + bl * sdob + hl * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=lm,
                     other=0.0)
        o = tl.load(O + bl * sob + hl * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=lm, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + bh.to(tl.int64) * Nq + offs_m, mask=mrow, other=0.0)
        tl.store(DELTA + bh.to(tl.int64) * Nq + offs_m, delta, mask=mrow)
        lse = tl.load(LSE + bh.to(tl.int64) * Nq + offs_m, mask=mrow, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        k_base = bl * skb + hk.to(tl.int64) * skh
        v_base = bl * svb + hk.to(tl.int64) * svh
        row = b * lay_sb + h * lay_sh + qb
        dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        fc = tl.load(FC + row)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, skn, skd, svn, svd,
                           FI + row.to(tl.int64) * F_W, PM, MT, fc, Nk, qk_scale, offs_m_loc, offs_n, offs_d,
                           dmask, False, EVEN_D, BLOCK_M, BLOCK_N, MASK_WORDS, UPCAST, DOT_PREC)
        pc = tl.load(PC + row)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, skn, skd, svn, svd,
                           PI + row.to(tl.int64) * P_W, PM + row.to(tl.int64) * P_W, MT, pc, Nk, qk_scale,
                           offs_m_loc, offs_n, offs_d, dmask, True, EVEN_D, BLOCK_M, BLOCK_N, MASK_WORDS,
                           UPCAST, DOT_PREC)
        dq = dq * sm_scale
        tl.store(DQ + bl * sdqb + hl * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=lm)

    @triton.jit
    def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stat_base, sqn, sqd, sdon, sdod,
                        IDX, MIDS, MT, cnt, Nq, qk_scale, offs_m0, offs_n_loc, offs_d, dmask,
                        PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        for j in range(cnt):
            qb = tl.load(IDX + j)
            offs_m = qb * BLOCK_M + offs_m0
            mrow = offs_m < Nq
            lm = mrow[:, None] & dmask[None, :]
            q = tl.load(Q + q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=lm, other=0.0)
            do = tl.load(DO + do_base + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=lm, other=0.0)
            lse = tl.load(LSE + stat_base + offs_m, mask=mrow, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(DELTA + stat_base + offs_m, mask=mrow, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
            if PARTIAL:
                keep = _load_bits(MT, tl.load(MIDS + j), offs_m0, offs_n_loc, MASK_WORDS, BLOCK_M, True)
                pT = tl.where(keep, pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                         sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                         FC, FI, PC, PI, PM, MT, lay_sb, lay_sh, F_W, P_W,
                         H, HKV, GROUP, Nq, Nk, qk_scale, sm_scale,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PREC: tl.constexpr):
        kb = tl.program_id(0)
        bhk = tl.program_id(1)
        b = bhk // HKV
        hk = bhk % HKV
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_n_loc = tl.arange(0, BLOCK_N)
        cols = kb * BLOCK_N + offs_n_loc
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        km = (cols < Nk)[:, None] & dmask[None, :]
        bl = b.to(tl.int64)
        hkl = hk.to(tl.int64)
        k = tl.load(K + bl * skb + hkl * skh + cols[:, None] * skn + offs_d[None, :] * skd, mask=km, other=0.0)
        v = tl.load(V + bl * svb + hkl * svh + cols[:, None] * svn + offs_d[None, :] * svd, mask=km, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        for g in range(GROUP):
            h = hk * GROUP + g
            hl = h.to(tl.int64)
            q_base = bl * sqb + hl * sqh
            do_base = bl * sdob + hl * sdoh
            stat_base = (bl * H + hl) * Nq
            row = b * lay_sb + h * lay_sh + kb
            fc = tl.load(FC + row)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stat_base, sqn, sqd,
                                     sdon, sdod, FI + row.to(tl.int64) * F_W, PM, MT, fc, Nq, qk_scale,
                                     offs_m0, offs_n_loc, offs_d, dmask, False, BLOCK_M, BLOCK_N, MASK_WORDS,
                                     UPCAST, DOT_PREC)
            pc = tl.load(PC + row)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stat_base, sqn, sqd,
                                     sdon, sdod, PI + row.to(tl.int64) * P_W, PM + row.to(tl.int64) * P_W, MT,
                                     pc, Nq, qk_scale, offs_m0, offs_n_loc, offs_d, dmask, True, BLOCK_M,
                                     BLOCK_N, MASK_WORDS, UPCAST, DOT_PREC)
        dk = dk * sm_scale
        tl.store(DK + bl * sdkb + hkl * sdkh + cols[:, None] * sdkn + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=km)
        tl.store(DV + bl * sdvb + hkl * sdvh + cols[:, None] * sdvn + offs_d[None, :] * sdvd,
                 dv.to(DV.dtype.element_ty), mask=km)


# ---------------------------------------------------------------------------------------------- host side
def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _dot_prec(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not (torch.backends.cuda.matmul.allow_tf32 and not INTERPRET):
        return "ieee"
    return "tf32"


def _row_strides(layout: BlockLayout, n_rows: int) -> Tuple[int, int]:
    """Strides (in rows) of the layout's batch and head dims; 0 where the layout broadcasts."""
    Bl, Hl = layout.batch_dim, layout.head_dim_
    return (Hl * n_rows if Bl > 1 else 0), (n_rows if Hl > 1 else 0)


def _common_consts(q: torch.Tensor, layout: BlockLayout) -> dict:
    D = q.shape[-1]
    return dict(HEAD_DIM=D, D_PAD=max(16, _next_pow2(D)), BLOCK_M=layout.block_m, BLOCK_N=layout.block_n,
                MASK_WORDS=layout.mask_table.shape[-1], UPCAST=INTERPRET and q.dtype != torch.float32,
                DOT_PREC=_dot_prec(q.dtype))


def _launch_opts(kernel: str, consts: dict, dtype: torch.dtype) -> dict:
    if INTERPRET:
        return {}
    w, s = kernel_config(kernel, consts["BLOCK_M"], consts["BLOCK_N"], consts["D_PAD"], dtype)
    return {"num_warps": w, "num_stages": s}


def _forward(q, k, v, layout: BlockLayout, scale: float, need_lse: bool):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32) if need_lse else o
    nqb = layout.num_q_blocks
    lay_sb, lay_sh = _row_strides(layout, nqb)
    c = _common_consts(q, layout)
    grid = (nqb, B * H)
    _fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        layout.full_counts, layout.full_indices, layout.partial_counts, layout.partial_indices,
        layout.partial_mask_ids, layout.mask_table, lay_sb, lay_sh,
        layout.full_indices.shape[-1], layout.partial_indices.shape[-1],
        H, H // Hkv, Nq, Nk, scale * LOG2E, STORE_LSE=need_lse, **c, **_launch_opts("fwd", c, q.dtype))
    return o, (lse if need_lse else None)


def _backward(do, q, k, v, o, lse, dlse, layout: BlockLayout, scale: float):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    c = _common_consts(q, layout)
    nqb, nkb = layout.num_q_blocks, layout.num_k_blocks
    lay_sb, lay_sh = _row_strides(layout, nqb)
    has_dlse = dlse is not None
    dlse_arg = dlse.contiguous() if has_dlse else delta
    _bwd_dq_kernel[(nqb, B * H)](
        q, k, v, o, do, dq, lse, dlse_arg, delta,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        layout.full_counts, layout.full_indices, layout.partial_counts, layout.partial_indices,
        layout.partial_mask_ids, layout.mask_table, lay_sb, lay_sh,
        layout.full_indices.shape[-1], layout.partial_indices.shape[-1],
        H, H // Hkv, Nq, Nk, scale * LOG2E, scale, HAS_DLSE=has_dlse, **c,
        **_launch_opts("bwd_dq", c, q.dtype))
    t = layout.transposed()
    tsb, tsh = _row_strides(layout, nkb)
    _bwd_dkdv_kernel[(nkb, B * Hkv)](
        q, k, v, do, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        t["full_counts"], t["full_indices"], t["partial_counts"], t["partial_indices"], t["partial_mask_ids"],
        layout.mask_table, tsb, tsh, t["full_indices"].shape[-1], t["partial_indices"].shape[-1],
        H, Hkv, H // Hkv, Nq, Nk, scale * LOG2E, scale, **c, **_launch_opts("bwd_dkdv", c, q.dtype))
    return dq, dk, dv


class _TritonBlockSparseAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale):  # type: ignore[override]
        o, lse = _forward(q, k, v, layout, scale, True)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout = layout
        ctx.scale = scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _backward(do, q, k, v, o, lse, dlse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


def triton_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                  scale: Optional[float] = None, return_lse: bool = False):
    """Kernel-order block-sparse attention with our Triton kernels (differentiable in q, k, v and LSE).

    q (B, H, Nq, D), k/v (B, H_kv, Nk, D) already in the layout's kernel order. Returns ``out`` or
    ``(out, lse)`` with lse fp32 (B, H, Nq). Prefer :func:`visattn.kernels.block_sparse_attention`.
    """
    why = _probe(q, layout, False)
    if why is not None:
        raise RuntimeError(f"triton backend cannot run: {why}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        o, lse = _TritonBlockSparseAttn.apply(q, k, v, layout, scale)
    else:
        o, lse = _forward(q, k, v, layout, scale, return_lse)
    return (o, lse) if return_lse else o


def _probe(q: torch.Tensor, layout: BlockLayout, needs_grad: bool) -> Optional[str]:
    if _TRITON_ERR is not None:
        return _TRITON_ERR
    if q.device.type == "cpu":
        if not INTERPRET:
            return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                    "visattn.kernels (or use backend='sdpa')")
    elif q.device.type != "cuda":
        return f"device {q.device.type!r} is not supported (allowed: cuda, or cpu with TRITON_INTERPRET=1)"
    elif INTERPRET:
        return "TRITON_INTERPRET=1 is set, so the kernels were built for the interpreter (CPU tensors only)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (allowed: float16, bfloat16, float32)"
    D = q.shape[-1]
    if not 16 <= D <= 256:
        return f"head dim {D} is not supported (allowed: 16..256, e.g. 32, 64, 80, 96, 128, 256)"
    for name, bs in (("block_m", layout.block_m), ("block_n", layout.block_n)):
        if bs < 16 or bs & (bs - 1):
            return f"layout {name}={bs} is not supported (allowed: a power of two >= 16)"
    return None


def _backend_fn(q, k, v, layout, scale, return_lse):
    return triton_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse)


register_backend(Backend("triton", _backend_fn, _probe, handles_permutation=False))
