"""Triton block-sparse flash attention (forward + backward) over a :class:`BlockLayout`; backend ``"triton"``.

Forward (one program per (query block, batch*head); the query block index is the fastest grid axis so a
head's K/V stay in L2): the row's FULL key blocks are visited with no element test and no ``tl.where``,
then its PARTIAL blocks, whose bit-packed element masks are read from ``layout.mask_table``. Online
softmax in base 2 with the scale folded in (``exp2(s * scale * log2 e)``), fp32 accumulation, fp32
log-sum-exp out. Rows with no kept key give 0 and LSE ``-inf`` with no NaN.

When a layout's rows differ a lot in length (longest > 1.25x mean: causal, borders) programs take rows
longest-first within each head (an order table per layout row), so short rows fill the tail of the grid.

Backward (deterministic, no atomics): one kernel per query block computes ``delta = rowsum(dO * O) - dLSE``
and dQ over the forward lists; one kernel per (key block, batch*kv_head) computes dK/dV over the
layout's transposed lists, summing the query heads of a GQA group in a fixed order.

Under ``TRITON_INTERPRET=1`` (CPU tests) dot operands are upcast to fp32, because the interpreter's bf16
``tl.dot`` is wrong; that flag must be set before this module is imported.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from .dispatch import Backend, register_backend
from .gather import permute_tokens
from .layout import BlockLayout

__all__ = ["triton_block_sparse_attention", "INTERPRET", "CONFIG_OVERRIDES", "kernel_config", "fuse_mode",
           "resolve_fuse_mode"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is optional at import time (probe explains)
    import triton
    import triton.language as tl

    _TRITON_ERR: Optional[str] = None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
    except Exception:  # older triton: no host-side tensor descriptors (pointer loads only)
        _TensorDescriptor = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERR = f"triton is not importable ({type(e).__name__}: {e})"
    _TensorDescriptor = None

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (kernel, block_m, block_n, d_pad, dtype) -> config dict (keys: TM, TN, num_warps, num_stages, and for
# "fwd" tma). Set by benchmarks/tuning; any key part may be None (wildcard); more specific keys win.
CONFIG_OVERRIDES: Dict[Tuple, dict] = {}
SHORT_ROW_BLOCKS = 32
PARTIAL_HEAVY = 0.1
# "auto" takes mode "q" (K/V by copies that keep TMA loads) when K and V hold at least this many bytes, else
# fused: below it the extra launches cost more host time than the TMA loads save. H100, 24 heads: 2-D NA "q"
# 13.0 vs fused 14.0 ms, 2-D GNA 9.9 vs 10.5, 3-D NA 52.5 vs 60.8, 3-D GNA 30.4 vs 30.2; a 128x128 + 512-token,
# 4-head call: host 0.19-0.25 vs 0.11-0.12 ms in a host-bound step (benchmarks/results/gather_probe_h100.json).
Q_MODE_MIN_BYTES = 64 << 20
# Where the layout's token permutation is applied (read at every call, so it can be switched in-process):
#   False: gather/scatter copies around the kernels;
#   True:  inside the kernels' loads and stores, no copies (K/V then use pointer loads, not TMA);
#   "q":   Q gather and output scatter inside the kernels, K/V by copies (K/V keep TMA loads);
#   "auto" (default): on CUDA without autograd, "q" when K/V are large (Q_MODE_MIN_BYTES), else True
#          (both faster than copies in the H100 NA cases, identical outputs; docs/BENCHMARKS.md);
#          copies on the CPU interpreter and when gradients are needed (the backward was measured with copies).
# Env VISATTN_FUSE_PERMUTATION: "1"/"true"/"all" -> True, "q" -> "q", "0"/"false"/"copy" -> False, unset -> "auto".
_FUSE_ENV = os.environ.get("VISATTN_FUSE_PERMUTATION", "auto").strip().lower()
_FUSE_ENV_VALUES = {"": "auto", "auto": "auto", "q": "q", "1": True, "true": True, "all": True,
                    "0": False, "false": False, "none": False, "copy": False, "copies": False}
if _FUSE_ENV not in _FUSE_ENV_VALUES:
    raise ValueError(f"VISATTN_FUSE_PERMUTATION={_FUSE_ENV!r} is not understood "
                     f"(allowed: {', '.join(repr(k) for k in _FUSE_ENV_VALUES if k)}, or unset for 'auto')")
FUSE_PERMUTATION = _FUSE_ENV_VALUES[_FUSE_ENV]


def kernel_config(kernel: str, block_m: int, block_n: int, d_pad: int, dtype: torch.dtype) -> dict:
    """Tile/launch config for ``kernel`` in {"fwd", "fwd_short", "fwd_partial", "bwd_dq", "bwd_dkdv"}.

    "fwd_short" serves layouts whose rows visit fewer than ``SHORT_ROW_BLOCKS`` key blocks on average
    (per-program set-up cost matters more there); "fwd_partial" layouts where at least
    ``PARTIAL_HEAVY`` of the visited blocks are PARTIAL (neighborhood windows). Both start from "fwd"
    and its overrides.

    ``TM`` x ``TN`` is the tile one loop step computes (it divides the layout block: a 128x128 layout
    block may run as 128x64 steps); ``num_warps`` / ``num_stages`` as in Triton; ``tma`` loads K/V
    with tensor descriptors (Hopper copy engine). Defaults are the H100 table (benchmarks/results).
    """
    base = "fwd" if kernel in ("fwd_short", "fwd_partial") else kernel
    cfg = _default_config(base, block_m, block_n, d_pad, dtype)
    if kernel == "fwd_partial" and dtype != torch.float32 and 64 < d_pad <= 128:
        cfg["num_stages"] = 2  # 2-D / 3-D NA on the H100: 3-10% faster than 3 stages in 4 runs of 5
    for name in dict.fromkeys((base, kernel)):  # "fwd" overrides also steer its two variants
        for key in ((name, None, None, None, None), (name, None, None, d_pad, None),
                    (name, block_m, block_n, d_pad, None), (name, block_m, block_n, d_pad, dtype)):
            if key in CONFIG_OVERRIDES:
                cfg.update(CONFIG_OVERRIDES[key])
    cfg["TM"] = min(cfg["TM"], block_m)
    cfg["TN"] = min(cfg["TN"], block_n)
    return cfg


def _default_config(kernel: str, block_m: int, block_n: int, d_pad: int, dtype: torch.dtype) -> dict:
    # measured on the H100 (torch 2.11, triton 3.6), bf16, 128x128 layout blocks, N=8192-16384 (JSON 'tune')
    if kernel == "fwd":
        if dtype == torch.float32:  # exact (FMA) dots: the config the GPU fp32 tests passed with, no TMA
            return {"TM": 128, "TN": 64, "num_warps": 8, "num_stages": 3, "tma": False}
        if d_pad <= 64:  # 419 TF/s dense at D=64 (8 warps: 319)
            return {"TM": 128, "TN": 128, "num_warps": 4, "num_stages": 3, "tma": True}
        if d_pad <= 128:  # 503 TF/s dense at D=128 (128x128 tiles, 8 warps: 487; no TMA: 384)
            return {"TM": 128, "TN": 64, "num_warps": 4, "num_stages": 3, "tma": True}
        return {"TM": 64, "TN": 64, "num_warps": 4, "num_stages": 2, "tma": True}  # D=256: not measured
    if kernel == "bwd_dq":  # 64x64 / 4 warps / 2 stages beat 128x64, 128x32, 64x128 at D=128
        return {"TM": 64, "TN": 64 if d_pad <= 128 else 32, "num_warps": 4, "num_stages": 2}
    return {"TM": 64 if d_pad <= 128 else 32, "TN": 64, "num_warps": 4, "num_stages": 2}


if triton is not None:

    @triton.jit
    def _load_bits(MT, mid, m_loc, n_loc, n0, MASK_WORDS: tl.constexpr, BLOCK_M: tl.constexpr, TMR: tl.constexpr,
                   TN: tl.constexpr, TRANSPOSED: tl.constexpr):
        """Unpack rows ``m_loc`` (TMR of them) x columns ``n0 + [0, TN)`` of mask_table[mid] to a bool tile
        (TMR, TN), or (TN, TMR) if TRANSPOSED. Reads each 32-bit word once when TN is a multiple of 32."""
        base = MT + mid.to(tl.int64) * (BLOCK_M * MASK_WORDS)
        if TN % 32 == 0:
            WT: tl.constexpr = TN // 32
            wcol = n0 // 32 + tl.arange(0, WT)
            words = tl.load(base + m_loc[:, None] * MASK_WORDS + wcol[None, :])  # (TMR, WT)
            bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
            bits = tl.reshape(bits, (TMR, TN))
            if TRANSPOSED:
                bits = tl.trans(bits)
        elif TRANSPOSED:
            words = tl.load(base + m_loc[None, :] * MASK_WORDS + (n_loc[:, None] // 32))
            bits = (words >> (n_loc[:, None] % 32)) & 1
        else:
            words = tl.load(base + m_loc[:, None] * MASK_WORDS + (n_loc[None, :] // 32))
            bits = (words >> (n_loc[None, :] % 32)) & 1
        return bits != 0

    @triton.jit
    def _map_rows(P, idx, n, PERM: tl.constexpr):
        """Kernel-order positions -> memory rows through the permutation ``P`` (invalid positions -> n)."""
        if PERM:
            return tl.load(P + idx, mask=idx < n, other=n)
        else:
            return idx

    @triton.jit
    def _load_tile(P, base, rows, srow, offs_d, sd, dmask, n_lim, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
        """Load a (len(rows), D_PAD) tile; rows >= n_lim (when ROW_MASK) and padded head dims read 0."""
        ptrs = P + base + rows[:, None] * srow + offs_d[None, :] * sd
        if ROW_MASK:
            return tl.load(ptrs, mask=(rows < n_lim)[:, None] & dmask[None, :], other=0.0)
        elif EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=dmask[None, :], other=0.0)

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, K, V, KD, VD, b, hk, k_base, v_base, skn, skd, svn, svd, IDX, MIDS, MT,
                   cnt, Nk, qk_scale, m_loc, offs_tn, offs_d, dmask, PK, PERM_K: tl.constexpr, PARTIAL: tl.constexpr,
                   EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TM: tl.constexpr,
                   TN: tl.constexpr,
                   D_PAD: tl.constexpr, MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, AT, AE, AXIS_W: tl.constexpr):
        NSUB: tl.constexpr = BLOCK_N // TN
        if PARTIAL and AXIS_W > 0:
            offs_w = tl.arange(0, AXIS_W)
            e_first = tl.load(AE + offs_w[:, None] * BLOCK_N + offs_tn[None, :])  # the only one when NSUB == 1
            if q.dtype == tl.float32:
                e_first = e_first.to(tl.float32)
        for t in range(cnt * NSUB):
            kb = tl.load(IDX + t // NSUB)
            n_loc = (t % NSUB) * TN + offs_tn
            col0 = kb * BLOCK_N + (t % NSUB) * TN
            if USE_TMA:  # out-of-range rows / head dims are zero-filled by the copy engine
                k = KD.load([b, hk, col0, 0]).reshape([TN, D_PAD])
                v = VD.load([b, hk, col0, 0]).reshape([TN, D_PAD])
            else:
                cols = _map_rows(PK, col0 + offs_tn, Nk, PERM_K)
                k = _load_tile(K, k_base, cols, skn, offs_d, skd, dmask, Nk, PARTIAL, EVEN_D)
                v = _load_tile(V, v_base, cols, svn, offs_d, svd, dmask, Nk, PARTIAL, EVEN_D)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if PARTIAL and AXIS_W > 0:  # factored mask: s = bias(row, axis coord) @ onehot(coord, column) + q k^T
                a = tl.load(AT + tl.load(MIDS + t // NSUB).to(tl.int64) * (BLOCK_M * AXIS_W)
                            + m_loc[:, None] * AXIS_W + offs_w[None, :])
                if NSUB == 1:
                    e = e_first
                else:
                    e = tl.load(AE + offs_w[:, None] * BLOCK_N + n_loc[None, :])
                if q.dtype == tl.float32:
                    a = a.to(tl.float32)
                    e = e.to(tl.float32)
                s = tl.dot(a, e, input_precision=DOT_PREC)  # first: it does not wait for the K tile
                s = tl.dot(q, tl.trans(k), s, input_precision=DOT_PREC)
            else:
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            s = s * qk_scale
            if PARTIAL and AXIS_W == 0:
                keep = _load_bits(MT, tl.load(MIDS + t // NSUB), m_loc, n_loc, (t % NSUB) * TN, MASK_WORDS,
                                  BLOCK_M, TM, TN, False)
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
    def _fwd_kernel(Q, K, V, KD, VD, O, LSE,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                    FC, FI, PC, PI, PM, MT, lay_sb, lay_sh, F_W, P_W,
                    H, GROUP, Nq, Nk, qk_scale,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    TM: tl.constexpr, TN: tl.constexpr, MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PREC: tl.constexpr, STORE_LSE: tl.constexpr, USE_TMA: tl.constexpr,
                    HAS_FULL: tl.constexpr, HAS_PARTIAL: tl.constexpr, ORDER, REORDER: tl.constexpr,
                    PQ, PK, PERM_Q: tl.constexpr, PERM_K: tl.constexpr, AT, AE, AXIS_W: tl.constexpr):
        SPLIT: tl.constexpr = BLOCK_M // TM
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        if REORDER:  # longest rows first (layout rows of very different lengths)
            qb = tl.load(ORDER + b * lay_sb + h * lay_sh + pid // SPLIT)
        else:
            qb = pid // SPLIT
        EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
        m_loc = (pid % SPLIT) * TM + tl.arange(0, TM)
        offs_m = qb * BLOCK_M + m_loc
        offs_tn = tl.arange(0, TN)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        mrow = offs_m < Nq
        q_base = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        qrows = _map_rows(PQ, offs_m, Nq, PERM_Q)  # memory rows (original positions)
        q = _load_tile(Q, q_base, qrows, sqn, offs_d, sqd, dmask, Nq, True, EVEN_D)
        if UPCAST:
            q = q.to(tl.float32)
        row = b * lay_sb + h * lay_sh + qb
        m_i = tl.full([TM], float("-inf"), tl.float32)
        l_i = tl.zeros([TM], tl.float32)
        acc = tl.zeros([TM, D_PAD], tl.float32)
        if HAS_FULL:
            fc = tl.load(FC + row)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, KD, VD, b, hk, k_base, v_base, skn, skd, svn, svd,
                                       FI + row.to(tl.int64) * F_W, PM, MT, fc, Nk, qk_scale,
                                       m_loc, offs_tn, offs_d, dmask, PK, PERM_K, False, EVEN_D, BLOCK_M, BLOCK_N, TM, TN, D_PAD,
                                       MASK_WORDS, UPCAST, DOT_PREC, USE_TMA, AT, AE, 0)
        if HAS_PARTIAL:
            pc = tl.load(PC + row)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, KD, VD, b, hk, k_base, v_base, skn, skd, svn, svd,
                                       PI + row.to(tl.int64) * P_W, PM + row.to(tl.int64) * P_W, MT, pc, Nk,
                                       qk_scale, m_loc, offs_tn, offs_d, dmask, PK, PERM_K, True, EVEN_D, BLOCK_M,
                                       BLOCK_N, TM, TN, D_PAD, MASK_WORDS, UPCAST, DOT_PREC, USE_TMA, AT, AE,
                                       AXIS_W)
        empty = l_i == 0.0
        if AXIS_W > 0:  # rows with no kept key saw only biased scores (below -MASK_BIG / 2 = -2**99): zero them
            empty = empty | (m_i < -6.338253001141147e29 * qk_scale)
            acc = tl.where(empty[:, None], 0.0, acc)
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        o_base = b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(O + o_base + qrows[:, None] * son + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=mrow[:, None] & dmask[None, :])
        if STORE_LSE:
            lse = tl.where(empty, float("-inf"),
                           (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
            tl.store(LSE + bh.to(tl.int64) * Nq + qrows, lse, mask=mrow)

    @triton.jit
    def _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, skn, skd, svn, svd, IDX, MIDS, MT, cnt,
                      Nk, qk_scale, m_loc, offs_tn, offs_d, dmask, PK, PERM_K: tl.constexpr, PARTIAL: tl.constexpr,
                      EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TM: tl.constexpr,
                      TN: tl.constexpr,
                      MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        NSUB: tl.constexpr = BLOCK_N // TN
        for t in range(cnt * NSUB):
            kb = tl.load(IDX + t // NSUB)
            n_loc = (t % NSUB) * TN + offs_tn
            cols = _map_rows(PK, kb * BLOCK_N + n_loc, Nk, PERM_K)
            k = _load_tile(K, k_base, cols, skn, offs_d, skd, dmask, Nk, PARTIAL, EVEN_D)
            v = _load_tile(V, v_base, cols, svn, offs_d, svd, dmask, Nk, PARTIAL, EVEN_D)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            p = tl.math.exp2(s * qk_scale - lse2[:, None])
            if PARTIAL:
                keep = _load_bits(MT, tl.load(MIDS + t // NSUB), m_loc, n_loc, (t % NSUB) * TN, MASK_WORDS,
                                  BLOCK_M, TM, TN, False)
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
                       BLOCK_N: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr, MASK_WORDS: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, HAS_DLSE: tl.constexpr,
                       HAS_FULL: tl.constexpr, HAS_PARTIAL: tl.constexpr, ORDER, REORDER: tl.constexpr,
                       PQ, PK, PERM_Q: tl.constexpr, PERM_K: tl.constexpr):
        SPLIT: tl.constexpr = BLOCK_M // TM
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        if REORDER:  # longest rows first (layout rows of very different lengths)
            qb = tl.load(ORDER + b * lay_sb + h * lay_sh + pid // SPLIT)
        else:
            qb = pid // SPLIT
        EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
        m_loc = (pid % SPLIT) * TM + tl.arange(0, TM)
        offs_m = qb * BLOCK_M + m_loc
        offs_tn = tl.arange(0, TN)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        mrow = offs_m < Nq
        bl = b.to(tl.int64)
        hl = h.to(tl.int64)
        qrows = _map_rows(PQ, offs_m, Nq, PERM_Q)  # memory rows (original positions)
        q = _load_tile(Q, bl * sqb + hl * sqh, qrows, sqn, offs_d, sqd, dmask, Nq, True, EVEN_D)
        do = _load_tile(DO, bl * sdob + hl * sdoh, qrows, sdon, offs_d, sdod, dmask, Nq, True, EVEN_D)
        o = _load_tile(O, bl * sob + hl * soh, qrows, son, offs_d, sod, dmask, Nq, True, EVEN_D)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + bh.to(tl.int64) * Nq + qrows, mask=mrow, other=0.0)
        tl.store(DELTA + bh.to(tl.int64) * Nq + qrows, delta, mask=mrow)
        lse = tl.load(LSE + bh.to(tl.int64) * Nq + qrows, mask=mrow, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        k_base = bl * skb + hk.to(tl.int64) * skh
        v_base = bl * svb + hk.to(tl.int64) * svh
        row = b * lay_sb + h * lay_sh + qb
        dq = tl.zeros([TM, D_PAD], tl.float32)
        if HAS_FULL:
            fc = tl.load(FC + row)
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, skn, skd, svn, svd,
                               FI + row.to(tl.int64) * F_W, PM, MT, fc, Nk, qk_scale, m_loc, offs_tn, offs_d,
                               dmask, PK, PERM_K, False, EVEN_D, BLOCK_M, BLOCK_N, TM, TN, MASK_WORDS, UPCAST, DOT_PREC)
        if HAS_PARTIAL:
            pc = tl.load(PC + row)
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, skn, skd, svn, svd,
                               PI + row.to(tl.int64) * P_W, PM + row.to(tl.int64) * P_W, MT, pc, Nk, qk_scale,
                               m_loc, offs_tn, offs_d, dmask, PK, PERM_K, True, EVEN_D, BLOCK_M, BLOCK_N, TM, TN,
                               MASK_WORDS, UPCAST, DOT_PREC)
        dq = dq * sm_scale
        tl.store(DQ + bl * sdqb + hl * sdqh + qrows[:, None] * sdqn + offs_d[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=mrow[:, None] & dmask[None, :])

    @triton.jit
    def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stat_base, sqn, sqd, sdon, sdod,
                        IDX, MIDS, MT, cnt, Nq, qk_scale, offs_tm, n_loc, n0, offs_d, dmask, PQ,
                        PERM_Q: tl.constexpr, PARTIAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, TM: tl.constexpr,
                        TN: tl.constexpr,
                        MASK_WORDS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        NSUB: tl.constexpr = BLOCK_M // TM
        for t in range(cnt * NSUB):
            qb = tl.load(IDX + t // NSUB)
            m_loc = (t % NSUB) * TM + offs_tm
            offs_m = qb * BLOCK_M + m_loc
            mrow = offs_m < Nq
            qrows = _map_rows(PQ, offs_m, Nq, PERM_Q)
            q = _load_tile(Q, q_base, qrows, sqn, offs_d, sqd, dmask, Nq, True, EVEN_D)
            do = _load_tile(DO, do_base, qrows, sdon, offs_d, sdod, dmask, Nq, True, EVEN_D)
            lse = tl.load(LSE + stat_base + qrows, mask=mrow, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(DELTA + stat_base + qrows, mask=mrow, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (TN, TM)
            pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
            if PARTIAL:
                keep = _load_bits(MT, tl.load(MIDS + t // NSUB), m_loc, n_loc, n0, MASK_WORDS, BLOCK_M, TM, TN,
                                  True)
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
                         BLOCK_N: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr, MASK_WORDS: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, HAS_FULL: tl.constexpr,
                         HAS_PARTIAL: tl.constexpr, ORDER, REORDER: tl.constexpr,
                         PQ, PK, PERM_Q: tl.constexpr, PERM_K: tl.constexpr):
        SPLIT: tl.constexpr = BLOCK_N // TN
        pid = tl.program_id(0)
        bhk = tl.program_id(1)
        b = bhk // HKV
        hk = bhk % HKV
        if REORDER:  # longest transposed rows (of the group's first head) first
            kb = tl.load(ORDER + b * lay_sb + (hk * GROUP) * lay_sh + pid // SPLIT)
        else:
            kb = pid // SPLIT
        EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
        offs_tm = tl.arange(0, TM)
        n0 = (pid % SPLIT) * TN
        n_loc = n0 + tl.arange(0, TN)
        cols = kb * BLOCK_N + n_loc
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        bl = b.to(tl.int64)
        hkl = hk.to(tl.int64)
        krows = _map_rows(PK, cols, Nk, PERM_K)  # memory rows (original positions)
        k = _load_tile(K, bl * skb + hkl * skh, krows, skn, offs_d, skd, dmask, Nk, True, EVEN_D)
        v = _load_tile(V, bl * svb + hkl * svh, krows, svn, offs_d, svd, dmask, Nk, True, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([TN, D_PAD], tl.float32)
        dv = tl.zeros([TN, D_PAD], tl.float32)
        for g in range(GROUP):
            h = hk * GROUP + g
            hl = h.to(tl.int64)
            q_base = bl * sqb + hl * sqh
            do_base = bl * sdob + hl * sdoh
            stat_base = (bl * H + hl) * Nq
            row = b * lay_sb + h * lay_sh + kb
            if HAS_FULL:
                fc = tl.load(FC + row)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stat_base, sqn, sqd,
                                         sdon, sdod, FI + row.to(tl.int64) * F_W, PM, MT, fc, Nq, qk_scale,
                                         offs_tm, n_loc, n0, offs_d, dmask, PQ, PERM_Q, False, EVEN_D, BLOCK_M, TM, TN, MASK_WORDS,
                                         UPCAST, DOT_PREC)
            if HAS_PARTIAL:
                pc = tl.load(PC + row)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stat_base, sqn, sqd,
                                         sdon, sdod, PI + row.to(tl.int64) * P_W, PM + row.to(tl.int64) * P_W, MT,
                                         pc, Nq, qk_scale, offs_tm, n_loc, n0, offs_d, dmask, PQ, PERM_Q, True,
                                         EVEN_D, BLOCK_M,
                                         TM, TN, MASK_WORDS, UPCAST, DOT_PREC)
        dk = dk * sm_scale
        km = (cols < Nk)[:, None] & dmask[None, :]
        tl.store(DK + bl * sdkb + hkl * sdkh + krows[:, None] * sdkn + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=km)
        tl.store(DV + bl * sdvb + hkl * sdvh + krows[:, None] * sdvn + offs_d[None, :] * sdvd,
                 dv.to(DV.dtype.element_ty), mask=km)


# ---------------------------------------------------------------------------------------------- host side
def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _dot_prec(dtype: torch.dtype) -> Optional[str]:
    """fp32 dots: exact ("ieee") unless torch allows tf32 matmuls; half types: Triton's default."""
    if dtype != torch.float32:
        return None
    return "tf32" if (torch.backends.cuda.matmul.allow_tf32 and not INTERPRET) else "ieee"


def _row_strides(layout: BlockLayout, n_rows: int) -> Tuple[int, int]:
    """Strides (in rows) of the layout's batch and head dims; 0 where the layout broadcasts."""
    Bl, Hl = layout.batch_dim, layout.head_dim_
    return (Hl * n_rows if Bl > 1 else 0), (n_rows if Hl > 1 else 0)


def _layout_info(layout: BlockLayout) -> dict:
    """Per-layout facts the launch needs (one host sync, cached): which loops exist, mean row length, PARTIAL
    fraction. Layout builders that know them may pre-fill ``_cache["triton_info"]`` (``partial_frac``
    optional: absent means not PARTIAL-heavy)."""
    if "triton_info" not in layout._cache:
        fc, pc = int(layout.full_counts.sum()), int(layout.partial_counts.sum())
        rows = layout.full_counts.numel()
        layout._cache["triton_info"] = {"HAS_FULL": fc > 0, "HAS_PARTIAL": pc > 0,
                                        "mean_row": (fc + pc) / max(rows, 1),
                                        "partial_frac": pc / max(fc + pc, 1)}
    return layout._cache["triton_info"]


REORDER_RATIO = 1.25


def _row_order(counts: torch.Tensor) -> Optional[torch.Tensor]:
    """Per (Bl, Hl) row: block indices sorted by list length, longest first, when the longest row is more
    than ``REORDER_RATIO`` x the mean (else None: natural order). int32, same shape as ``counts``."""
    c = counts.float()
    if c.numel() == 0 or float(c.max()) <= REORDER_RATIO * max(float(c.mean()), 1e-9):
        return None
    return torch.argsort(counts, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()


def _orders(layout: BlockLayout, transposed: bool) -> Optional[torch.Tensor]:
    key = "triton_order_t" if transposed else "triton_order"
    if key not in layout._cache:
        if transposed:
            t = layout.transposed()
            counts = t["full_counts"] + t["partial_counts"]
        else:
            counts = layout.full_counts + layout.partial_counts
        layout._cache[key] = _row_order(counts)
    return layout._cache[key]


def _order_args(layout: BlockLayout, transposed: bool) -> dict:
    order = _orders(layout, transposed)
    return {"ORDER": order if order is not None else layout.full_counts, "REORDER": order is not None}


def _common_consts(q: torch.Tensor, layout: BlockLayout) -> dict:
    D = q.shape[-1]
    info = _layout_info(layout)
    return dict(HAS_FULL=info["HAS_FULL"], HAS_PARTIAL=info["HAS_PARTIAL"], HEAD_DIM=D, D_PAD=max(16, _next_pow2(D)),
                BLOCK_M=layout.block_m, BLOCK_N=layout.block_n, MASK_WORDS=layout.mask_table.shape[-1], UPCAST=INTERPRET and q.dtype != torch.float32,
                DOT_PREC=_dot_prec(q.dtype))


def _launch(kernel: str, c: dict, dtype: torch.dtype) -> Tuple[dict, dict]:
    """(constexpr tile args, launch options) for one kernel."""
    cfg = kernel_config(kernel, c["BLOCK_M"], c["BLOCK_N"], c["D_PAD"], dtype)
    opts = {} if INTERPRET else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return cfg, opts


def _tma_ok(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (_TensorDescriptor is not None and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((st * es) % 16 == 0 for st in t.stride()[:-1]))


def _fuse_flags(fused) -> Tuple[bool, bool]:
    """``fused`` as (q/o side, k/v side): a bool for both, or a pair."""
    if isinstance(fused, (tuple, list)):
        return bool(fused[0]), bool(fused[1])
    return bool(fused), bool(fused)


def _perm_args(layout: BlockLayout, fused) -> dict:
    """Permutation pointers for the kernels: with ``fused`` (a bool, or a (q, k) pair of bools) the kernels
    gather q (and/or k/v) rows and scatter the outputs (and/or dk/dv) through ``perm_q`` / ``perm_k``
    themselves (those tensors stay in original order)."""
    out = {}
    for name, perm, f in zip(("Q", "K"), (layout.perm_q, layout.perm_k), _fuse_flags(fused)):
        on = f and perm is not None
        if on:
            key = f"triton_perm_{name}"
            cached = layout._cache.get(key)
            if cached is None:
                cached = perm.to(torch.int32).contiguous()
                # inside a CUDA-graph capture the copy only runs at replay: never cache such a tensor
                if not (perm.is_cuda and torch.cuda.is_current_stream_capturing()):
                    layout._cache[key] = cached
            out[f"P{name}"] = cached
        else:
            out[f"P{name}"] = layout.full_counts  # unused placeholder pointer
        out[f"PERM_{name}"] = on
    return out


def _forward(q, k, v, layout: BlockLayout, scale: float, need_lse: bool, fused=False):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32) if need_lse else o
    nqb = layout.num_q_blocks
    lay_sb, lay_sh = _row_strides(layout, nqb)
    c = _common_consts(q, layout)
    info = _layout_info(layout)
    kname = ("fwd_short" if info["mean_row"] < SHORT_ROW_BLOCKS
             else "fwd_partial" if info.get("partial_frac", 0.0) >= PARTIAL_HEAVY else "fwd")
    cfg, opts = _launch(kname, c, q.dtype)
    perm = _perm_args(layout, fused)
    use_tma = bool(cfg.get("tma")) and not perm["PERM_K"] and _tma_ok(k) and _tma_ok(v)
    if use_tma:
        blk = [1, 1, cfg["TN"], c["D_PAD"]]
        kd = _TensorDescriptor(k, list(k.shape), list(k.stride()), blk)
        vd = _TensorDescriptor(v, list(v.shape), list(v.stride()), blk)
    else:
        kd, vd = k, v
    # the factored masks bias scores by -2**100 before scaling: only a positive scale keeps them dominant
    factors = layout.mask_factors if (c["HAS_PARTIAL"] and cfg.get("factors", True) and scale > 0) else None
    grid = (nqb * (c["BLOCK_M"] // cfg["TM"]), B * H)
    _fwd_kernel[grid](
        q, k, v, kd, vd, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        layout.full_counts, layout.full_indices, layout.partial_counts, layout.partial_indices,
        layout.partial_mask_ids, layout.mask_table, lay_sb, lay_sh,
        layout.full_indices.shape[-1], layout.partial_indices.shape[-1],
        H, H // Hkv, Nq, Nk, scale * LOG2E, TM=cfg["TM"], TN=cfg["TN"], STORE_LSE=need_lse, USE_TMA=use_tma,
        AT=layout.mask_table if factors is None else factors[0],
        AE=layout.mask_table if factors is None else factors[1], AXIS_W=0 if factors is None else factors[0].shape[-1],
        **_order_args(layout, False), **perm, **c, **opts)
    return o, (lse if need_lse else None)


def _backward(do, q, k, v, o, lse, dlse, layout: BlockLayout, scale: float, fused=False):
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
    perm = _perm_args(layout, fused)
    cfg, opts = _launch("bwd_dq", c, q.dtype)
    _bwd_dq_kernel[(nqb * (c["BLOCK_M"] // cfg["TM"]), B * H)](
        q, k, v, o, do, dq, lse, dlse_arg, delta,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        layout.full_counts, layout.full_indices, layout.partial_counts, layout.partial_indices,
        layout.partial_mask_ids, layout.mask_table, lay_sb, lay_sh,
        layout.full_indices.shape[-1], layout.partial_indices.shape[-1],
        H, H // Hkv, Nq, Nk, scale * LOG2E, scale, TM=cfg["TM"], TN=cfg["TN"], HAS_DLSE=has_dlse,
        **_order_args(layout, False), **perm, **c, **opts)
    t = layout.transposed()
    tsb, tsh = _row_strides(layout, nkb)
    cfg, opts = _launch("bwd_dkdv", c, q.dtype)
    _bwd_dkdv_kernel[(nkb * (c["BLOCK_N"] // cfg["TN"]), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        t["full_counts"], t["full_indices"], t["partial_counts"], t["partial_indices"], t["partial_mask_ids"],
        layout.mask_table, tsb, tsh, t["full_indices"].shape[-1], t["partial_indices"].shape[-1],
        H, Hkv, H // Hkv, Nq, Nk, scale * LOG2E, scale, TM=cfg["TM"], TN=cfg["TN"], **_order_args(layout, True),
        **perm, **c, **opts)
    return dq, dk, dv


class _TritonBlockSparseAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, fused):  # type: ignore[override]
        o, lse = _forward(q, k, v, layout, scale, True, fused)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout = layout
        ctx.scale = scale
        ctx.fused = fused
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _backward(do, q, k, v, o, lse, dlse, ctx.layout, ctx.scale, ctx.fused)
        return dq, dk, dv, None, None, None


def _run(q, k, v, layout, scale, return_lse, fused):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        o, lse = _TritonBlockSparseAttn.apply(q, k, v, layout, scale, fused)
    else:
        o, lse = _forward(q, k, v, layout, scale, return_lse, fused)
    return o, lse


def fuse_mode(value) -> Tuple[bool, bool]:
    """(fuse q/o, fuse k/v) for a ``fuse_permutation`` / ``FUSE_PERMUTATION`` value: False, True or "q"
    ("auto" is resolved per call by :func:`resolve_fuse_mode`)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            raise ValueError("fuse_permutation='auto' depends on the call; use resolve_fuse_mode()")
        if v == "q":
            return True, False
        if v in ("1", "true", "all"):
            return True, True
        if v in ("", "0", "false", "none", "copy", "copies"):
            return False, False
        raise ValueError(f"fuse_permutation must be False, True, 'q' or 'auto', got {value!r}")
    return bool(value), bool(value)


def resolve_fuse_mode(value, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout):
    """The concrete mode (False, True or "q") for one call; "auto" picks by device, autograd, permutation and size."""
    if not (isinstance(value, str) and value.strip().lower() == "auto"):
        return value
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type != "cuda" or needs_grad or (layout.perm_q is None and layout.perm_k is None):
        return False
    return "q" if _nbytes(k) + _nbytes(v) >= Q_MODE_MIN_BYTES else True


def _nbytes(t) -> int:
    shape = getattr(t, "shape", None)
    return 0 if shape is None else t.numel() * t.element_size()


def _heads_last(t: torch.Tensor) -> bool:
    """A (B, H, N, D) view of (B, N, H, D) memory (the usual ``x.view(B, N, H, D).transpose(1, 2)``)."""
    return t.shape[1] > 1 and t.shape[2] > 1 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous()


def _permute(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``x[:, :, perm]`` in one copy: the Triton gather on CUDA (differentiable), ``index_select`` on the CPU."""
    if x.is_cuda:
        return permute_tokens(x, perm, inv)
    return x.index_select(2, perm)


def _unpermute_like(o: torch.Tensor, inv: torch.Tensor, like: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``o[:, :, inv]`` in one copy, laid out like ``like``: heads-last inputs get a heads-last output, so
    the caller's ``out.transpose(1, 2).reshape(B, N, H * D)`` is a view, not a second copy."""
    heads_last = _heads_last(like)
    if o.is_cuda:
        return permute_tokens(o, inv, perm, heads_last=heads_last)
    if heads_last:
        return o.transpose(1, 2).index_select(1, inv).transpose(1, 2)
    return o.index_select(2, inv)


def triton_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                  scale: Optional[float] = None, return_lse: bool = False,
                                  fuse_permutation=None):
    """Block-sparse attention with our Triton kernels (differentiable in q, k, v and LSE).

    q (B, H, Nq, D), k/v (B, H_kv, Nk, D) in *original* token order. The layout's permutation, if any,
    is applied by gather/scatter copies around the kernels (``False``), inside the kernels'
    loads and stores (``True``: no copies; K/V loads then use pointers, not TMA), half and half
    (``"q"``: the Q gather and the output scatter inside the kernel, K/V by copies that keep TMA loads), or
    ``"auto"`` (the default: on CUDA inference "q" for large K/V, True for small ones, else copies).
    ``fuse_permutation=None`` reads the module flag ``FUSE_PERMUTATION`` (env
    ``VISATTN_FUSE_PERMUTATION=1`` / ``q``) at call time. Each copy is one gather (``kernels/gather.py``
    on CUDA, ``index_select`` on the CPU) that also does the heads transpose of heads-last inputs; the
    output has q's layout ((B, N, H, D) memory for a heads-last q). Returns ``out`` or ``(out, lse)`` with lse fp32 (B, H, Nq).
    Prefer :func:`visattn.kernels.block_sparse_attention`.
    """
    why = _probe(q, layout, False)
    if why is not None:
        raise RuntimeError(f"triton backend cannot run: {why}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mode = FUSE_PERMUTATION if fuse_permutation is None else fuse_permutation
    fq, fk = fuse_mode(resolve_fuse_mode(mode, q, k, v, layout))
    pq, pk = layout.perm_q, layout.perm_k
    fq, fk = fq and pq is not None, fk and pk is not None
    qp = q if pq is None or fq else _permute(q, pq, layout.inv_perm_q)
    kp = k if pk is None or fk else _permute(k, pk, layout.inv_perm_k)
    vp = v if pk is None or fk else _permute(v, pk, layout.inv_perm_k)
    o, lse = _run(qp, kp, vp, layout, scale, return_lse, (fq, fk))
    if pq is not None and not fq:
        inv = layout.inv_perm_q
        o = _unpermute_like(o, inv, q, pq)
        lse = None if lse is None else lse.index_select(2, inv)
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


register_backend(Backend("triton", _backend_fn, _probe, handles_permutation=True))
