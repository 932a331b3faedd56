"""Neighborhood attention benchmark (issue 4): ours (Triton, block-sparse, tiled) vs dense SDPA and FlexAttention.

    python benchmarks/bench_neighborhood.py --stats-only            # block counts + tile candidates (CPU, any device)
    python benchmarks/bench_neighborhood.py --quick                 # forward: dense vs ours (default settings)
    python benchmarks/bench_neighborhood.py --sections fwd,e2e,fwdbwd --budget-s 430 --out A.json        # H100 1
    python benchmarks/bench_neighborhood.py --sections 64x64,flex,flex-untiled,flex-bwd --budget-s 430 --out B.json
    python benchmarks/bench_neighborhood.py --merge A.json B.json --out benchmarks/results/neighborhood_h100.json
    python benchmarks/bench_neighborhood.py --e2e-only              # the end-to-end denoising step only

Sections (run in the order below, each over the selected cases; an item (one section of one case) that
would not fit in ``--budget-s`` is skipped and recorded as "skipped: budget"):

- ``fwd``: dense cuDNN and flash SDPA; ours with the automatic block size and tiles, once per permutation
  mode (``copy``: gather/scatter copies; ``fused``: inside the kernel loads/stores; ``fused_q``: Q and the
  output inside the kernel, K/V by copies that keep TMA loads), switched in-process; the kernel alone and the
  copies alone; ours with the other block size (128x128 <-> 128x64); heads-last inputs ((B, N, H, D) memory
  and a (B, N, H*D) output, as in a model) for dense cuDNN and ours in every mode; max error vs fp32 rows.
- ``e2e``: one denoising step of a tiny-width, full-resolution (2048 px) Flux-style transformer: dense vs NA vs
  GNA vs the ``flux-2k`` preset, time and peak memory, in the ``copy`` mode and the mode that won most forward
  cases (``--all-modes``: every mode). Per config, one extra step also records the attention calls and their
  summed GPU time (``*_attn_ms``, ``*_attn_calls``, ``*_backends``), the CPU time to enqueue the step
  (``*_host_issue_ms``: near the step time means host-bound) and the layout's block counts (``*_layout``).
- ``fwdbwd``: forward+backward, dense cuDNN and flash, ours in ``copy`` and the case's fastest forward mode
  (``--all-modes``: every mode).
- ``64x64``: ours with 64x64 blocks (NA cases).
- ``flex``: FlexAttention (torch.compile) on the identical layout (compile time recorded separately).
- ``flex-untiled``: FlexAttention on row-major tokens with the NA ``mask_mod`` (NATTEN's flex path, no tiling).
- ``flex-bwd``: FlexAttention forward+backward on the identical layout.

``--merge A.json B.json ...`` merges the rows of several runs (later files win per key) into ``--out`` and
prints the tables.

Every "ours" time includes the token permutation (except the ``kernel`` figures). Progress is printed and
flushed per measurement, and the JSON (``--out``) is rewritten after every measurement, so a run cut off by
a timeout keeps what it measured; re-running merges into the same file (``--fresh`` starts over). On a machine
without CUDA the cases are tiny (a logic check only).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from _timing import median_ms  # noqa: E402

from visattn.functional import neighborhood_attention  # noqa: E402
from visattn.kernels import block_sparse_attention  # noqa: E402
from visattn.kernels.gather import gather_tokens  # noqa: E402
from visattn.kernels.layout import block_lists  # noqa: E402
from visattn.methods import _na_layout as nl  # noqa: E402
from visattn.methods._na_mask import axis_windows, make_mask_mod  # noqa: E402
from visattn.methods.neighborhood import make_spec  # noqa: E402

# name, (B, H, shape, D), kernel, stride, target speed-up over dense
CASES = [
    ("2d-na", (1, 24, (256, 256), 128), (80, 80), (1, 1), 6.0),
    ("2d-gna", (1, 24, (256, 256), 128), (80, 80), (16, 16), 10.0),
    ("3d-na", (1, 24, (30, 48, 80), 128), (18, 24, 24), (1, 1, 1), 3.5),
    ("3d-gna", (1, 24, (30, 48, 80), 128), (18, 24, 24), (16, 8, 8), 10.0),
    ("1d-na", (1, 24, (32768,), 128), (2048,), (1,), 8.0),
]
TINY = [
    ("2d-na", (1, 2, (24, 32), 32), (8, 8), (1, 1), None),
    ("2d-gna", (1, 2, (24, 32), 32), (8, 8), (4, 4), None),
    ("3d-na", (1, 2, (4, 8, 12), 32), (2, 4, 4), (1, 1, 1), None),
    ("1d-na", (1, 2, (512,), 32), (64,), (1,), None),
]
MODES = ("copy", "fused", "fused_q")
MODE_FLAG = {"copy": False, "fused": True, "fused_q": "q"}
SECTIONS = ("fwd", "e2e", "fwdbwd", "64x64", "flex", "flex-untiled", "flex-bwd")  # run in this order
# rough wall-clock cost (s) of items, for the budget check (first Flex compile of a process is the slowest)
EST = {"fwd": 45, "flex": 75, "flex-untiled": 75, "64x64": 25, "fwdbwd": 60, "e2e": 90, "flex-bwd": 150}


def log(msg: str) -> None:
    print(msg, flush=True)


def allowed_pairs(spec) -> int:
    """Number of kept (query, key) grid pairs: separable over axes."""
    total = 1
    for L, k, d, s, c in zip(spec.shape, spec.kernel, spec.dilation, spec.stride, spec.causal):
        _, _, lo, hi = axis_windows(L, k, d, s, c)
        total *= int((hi - lo + 1).sum())
    return total


class Recorder:
    """Holds the results; rewrites the JSON after every measurement (atomic rename) and logs it."""

    def __init__(self, path: str, meta: dict, fresh: bool, budget_s: float):
        self.path, self.t0, self.budget = path, time.perf_counter(), budget_s
        self.data = {"meta": meta, "kernels": [], "e2e": None}
        if os.path.exists(path) and not fresh:
            with open(path) as f:
                old = json.load(f)
            self.data["kernels"] = old.get("kernels", [])
            self.data["e2e"] = old.get("e2e")
            self.data["meta_previous"] = old.get("meta")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, est_s: float) -> bool:
        return self.budget <= 0 or self.elapsed() + est_s <= self.budget

    def row(self, case: str) -> dict:
        for r in self.data["kernels"]:
            if r.get("case") == case:
                return r
        r = {"case": case}
        self.data["kernels"].append(r)
        order = [c[0] for c in CASES]
        self.data["kernels"].sort(key=lambda x: order.index(x["case"]) if x.get("case") in order else len(order))
        return r

    def put(self, target: dict, key: str, value, label: str = "") -> None:
        target[key] = value
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)[:160]
        log(f"[{self.elapsed():7.1f}s] {label or target.get('case', '')}: {key} = {shown}")
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _try(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as e:  # record, keep going: one failing baseline must not lose the other figures
        msg = f"failed: {type(e).__name__}: {str(e)[:300]}"
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return msg


@contextlib.contextmanager
def perm_mode(mode: str):
    """Switch where the Triton backend applies the token permutation, in-process (read per call)."""
    from visattn.kernels import triton_backend as tb
    saved = tb.FUSE_PERMUTATION
    tb.FUSE_PERMUTATION = MODE_FLAG[mode]
    try:
        yield
    finally:
        tb.FUSE_PERMUTATION = saved


def sdpa_fns(cuda: bool) -> Dict[str, Callable]:
    if not cuda:
        return {"sdpa": F.scaled_dot_product_attention}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(backend):
        def fn(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return fn

    return {"cudnn": make(SDPBackend.CUDNN_ATTENTION), "flash": make(SDPBackend.FLASH_ATTENTION)}


def _raise_compile_limits() -> None:
    """Every case/layout recompiles flex_attention; the default recompile limit (8) would silently fall back to
    eager flex (which materialises N x N scores)."""
    try:
        import torch._dynamo as dynamo
    except Exception:
        return
    for name, val in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 4096),
                      ("accumulated_cache_size_limit", 4096)):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, val)


class Case:
    """Inputs, layouts and helpers of one benchmark case."""

    def __init__(self, name, dims, kernel, stride, target, device, dtype):
        B, H, shape, D = dims
        self.name, self.dims, self.kernel, self.stride, self.target = name, dims, kernel, stride, target
        self.device, self.dtype, self.cuda = device, dtype, device == "cuda"
        self.spec = make_spec(shape, kernel, stride=stride)
        self.N = N = self.spec.seq_len
        g = torch.Generator(device=device).manual_seed(0)
        self.q, self.k, self.v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        self.kw = dict(spatial_shape=shape, kernel_size=kernel, stride=stride)
        self.pairs = allowed_pairs(self.spec) * B * H
        self.auto_bs = nl.auto_block_size(self.spec, device, D)
        self.backend = "triton" if (self.cuda or _interpreter()) else "sdpa"

    def layout(self, bs, kernel_order=False):
        return nl.get_layout(self.spec, bs, self.device, kernel_order=kernel_order)

    def ours(self, q=None, k=None, v=None, bs=None, backend=None):
        q = self.q if q is None else q
        return neighborhood_attention(q, self.k if k is None else k, self.v if v is None else v,
                                      backend=backend or self.backend, block_size=bs, **self.kw)

    def max_err(self, out, q=None, k=None, v=None) -> float:
        """Max abs error of sampled rows (+ first and last) against an fp32 reference of those rows."""
        q, k, v = (self.q if q is None else q), (self.k if k is None else k), (self.v if v is None else v)
        N, dev = self.N, self.device
        rows = torch.cat([torch.tensor([0, N - 1]), torch.randperm(N, generator=torch.Generator().manual_seed(1))[:62]])
        rows = rows.to(dev)
        mask = make_mask_mod(self.spec, dev)(0, 0, rows[:, None], torch.arange(N, device=dev)[None, :])
        s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.float()
        return float((out[:, :, rows].float() - ref).abs().max())

    def time(self, fn, reps, warmup) -> float:
        return median_ms(fn, reps, warmup, self.cuda)


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """The same values as a (B, H, N, D) view of (B, N, H, D) memory (what adapters hand over)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _to_tokens(o: torch.Tensor) -> torch.Tensor:
    """What a model does with the attention output: (B, N, H * D) (a view when ``o`` is heads-last)."""
    B, H, N, D = o.shape
    return o.transpose(1, 2).reshape(B, N, H * D)


# ------------------------------------------------------------------------------------------------ sections
def section_fwd(c: Case, rec: Recorder, reps: int, warmup: int, quick: bool) -> None:
    r = rec.row(c.name)
    B, H, shape, D = c.dims
    r.update(shape=f"({B}, {H}, {'x'.join(map(str, shape))}, {D})", kernel=list(c.kernel), stride=list(c.stride),
             target_x=c.target, element_density=c.pairs / (B * H * c.N * c.N))
    t0 = time.perf_counter()
    lay = c.layout(c.auto_bs)
    if c.cuda:
        torch.cuda.synchronize()
    st = lay.stats()
    r.update(block_m=c.auto_bs[0], block_n=c.auto_bs[1], tile=list(lay._cache.get("tile", ())),
             sub_tile=list(lay._cache.get("sub_tile", ())), full=st["full"], partial=st["partial"],
             empty=st["empty"], block_density=st["density"], permuted=lay.perm_q is not None,
             mask_table_rows=int(lay.mask_table.shape[0]))
    rec.put(r, "layout_build_s", time.perf_counter() - t0)
    for nm, fn in sdpa_fns(c.cuda).items():
        rec.put(r, f"dense_{nm}_ms", _try(lambda fn=fn: c.time(lambda: fn(c.q, c.k, c.v), reps, warmup)))
    dense = [t for key, t in r.items() if key.startswith("dense_") and key.endswith("_ms") and isinstance(t, float)]
    r["dense_ms"] = min(dense) if dense else None
    modes = MODES if (lay.perm_q is not None and c.backend == "triton") else ("copy",)
    if quick:
        modes = ("copy",)
    for mode in modes:
        with perm_mode(mode):
            rec.put(r, f"ours_{mode}_ms", _try(lambda: c.time(lambda: c.ours(), reps, warmup)))
            with torch.no_grad():
                rec.put(r, f"err_{mode}", _try(lambda: c.max_err(c.ours())))
    times = {m: r[f"ours_{m}_ms"] for m in modes if isinstance(r.get(f"ours_{m}_ms"), float)}
    if times:
        best = min(times, key=times.get)
        r.update(ours_ms=times["copy"] if "copy" in times else times[best], best_mode=best, ours_best_ms=times[best],
                 max_abs_err_vs_fp32=max(r[f"err_{m}"] for m in times if isinstance(r.get(f"err_{m}"), float)))
        r["useful_tflops"] = 4 * c.pairs * D / (times[best] * 1e-3) / 1e12
        if r["dense_ms"]:
            for m, t in times.items():
                r[f"speedup_{m}_x"] = r["dense_ms"] / t
            r["speedup_x"] = r["dense_ms"] / times[best]
        rec.save()
    # the kernel alone (inputs already in kernel order) and the copies alone
    korder = c.layout(c.auto_bs, kernel_order=True)
    if lay.perm_q is not None:
        qp, kp, vp = (t.index_select(2, lay.perm_q) for t in (c.q, c.k, c.v))
    else:
        qp, kp, vp = c.q, c.k, c.v
    rec.put(r, "ours_kernel_ms", _try(lambda: c.time(
        lambda: block_sparse_attention(qp, kp, vp, korder, backend=c.backend), reps, warmup)))
    if lay.perm_q is not None:
        inv = lay.inv_perm_q
        rec.put(r, "permute_ms", _try(lambda: c.time(
            lambda: [gather_tokens(t, lay.perm_q) for t in (c.q, c.k, c.v)] + [gather_tokens(qp, inv)],
            reps, warmup)))
        rec.put(r, "permute_index_select_ms", _try(lambda: c.time(
            lambda: [t.index_select(2, lay.perm_q) for t in (c.q, c.k, c.v)] + [qp.index_select(2, inv)],
            reps, warmup)))
    else:
        r["permute_ms"] = 0.0
    if quick:
        return
    # the other block size (copy mode: the block size changes the kernel work, not the permutation)
    other = (128, 128) if tuple(c.auto_bs) == (128, 64) else (128, 64)
    if not c.cuda:
        other = (32, 16)
    tag = f"{other[0]}x{other[1]}"
    lo = c.layout(other)
    so = lo.stats()
    r.update({f"full_{tag}": so["full"], f"partial_{tag}": so["partial"], f"tile_{tag}": list(lo._cache["tile"]),
              f"sub_tile_{tag}": list(lo._cache["sub_tile"])})
    with perm_mode("copy"):
        rec.put(r, f"ours_{tag}_copy_ms", _try(lambda: c.time(lambda: c.ours(bs=other), reps, warmup)))
    ko = c.layout(other, kernel_order=True)
    if lo.perm_q is not None:
        qo, ko_, vo = (t.index_select(2, lo.perm_q) for t in (c.q, c.k, c.v))
    else:
        qo, ko_, vo = c.q, c.k, c.v
    rec.put(r, f"ours_{tag}_kernel_ms", _try(lambda: c.time(
        lambda: block_sparse_attention(qo, ko_, vo, ko, backend=c.backend), reps, warmup)))
    # heads-last inputs and a (B, N, H*D) output, as inside a model; dense gets the same views
    qh, kh, vh = (_heads_last(t) for t in (c.q, c.k, c.v))
    if c.cuda:
        fn = sdpa_fns(True)["cudnn"]
        rec.put(r, "hl_dense_cudnn_ms", _try(lambda: c.time(lambda: _to_tokens(fn(qh, kh, vh)), reps, warmup)))
    for mode in modes:
        with perm_mode(mode):
            rec.put(r, f"hl_ours_{mode}_ms", _try(lambda: c.time(lambda: _to_tokens(c.ours(qh, kh, vh)), reps,
                                                                    warmup)))


def _flex_warm_and_time(c: Case, rec: Recorder, r: dict, key: str, fn: Callable, reps: int) -> None:
    t0 = time.perf_counter()
    first = _try(fn)
    if c.cuda:
        torch.cuda.synchronize()
    rec.put(r, f"{key}_compile_s", time.perf_counter() - t0 if not isinstance(first, str) else first)
    if isinstance(first, str):
        return
    rec.put(r, f"{key}_ms", _try(lambda: c.time(fn, reps, 1)))


def _flex_blocks(c: Case) -> list:
    """Flex runs on our layout (auto block size); if Flex cannot use that block size, on 128x128 (same mask)."""
    return [c.auto_bs] + ([(128, 128)] if c.cuda and tuple(c.auto_bs) != (128, 128) else [])


def section_flex(c: Case, rec: Recorder, reps: int) -> None:
    r = rec.row(c.name)
    with torch.no_grad():
        for bs in _flex_blocks(c):
            r["flex_block"] = f"{bs[0]}x{bs[1]}"
            _flex_warm_and_time(c, rec, r, "flex_same_layout", lambda: c.ours(bs=bs, backend="flex"), reps)
            if isinstance(r.get("flex_same_layout_ms"), float):
                break
            r[f"flex_{bs[0]}x{bs[1]}_error"] = r.get("flex_same_layout_compile_s")
        if isinstance(r.get("flex_same_layout_ms"), float):
            out = c.ours(bs=bs, backend="flex")
            rec.put(r, "flex_err", c.max_err(out))
            if isinstance(r.get("ours_best_ms"), float):
                rec.put(r, "flex_over_ours_x", r["flex_same_layout_ms"] / r["ours_best_ms"])


def section_flex_untiled(c: Case, rec: Recorder, reps: int) -> None:
    """Compiled FlexAttention on row-major tokens (no tiling) with the NA mask_mod in its partial blocks and the
    exact FULL/PARTIAL block lists of that order (NATTEN's flex path without token permutation)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    r = rec.row(c.name)
    spec, dev, N = c.spec, c.device, c.N
    bs = 128 if c.cuda else 32
    full, partial = nl.classify_blocks(spec, torch.arange(N, device=dev), (bs, bs))
    if N % bs:
        partial[:, -1] |= full[:, -1]
        full[:, -1] = False
    nkb = full.shape[1]
    r.update(untiled_full=int(full.sum()), untiled_partial=int(partial.sum()))

    def lists(sel):
        idx, cnt = block_lists(sel)
        out = torch.zeros(1, 1, sel.shape[0], nkb, dtype=torch.int32, device=dev)
        out[..., :idx.shape[-1]] = idx
        return cnt[None, None].contiguous(), out

    pc, pi = lists(partial)
    fc, fi = lists(full)
    bm = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=bs, mask_mod=make_mask_mod(spec, dev), seq_lengths=(N, N))
    fn = torch.compile(flex_attention, dynamic=False) if c.cuda else flex_attention
    with torch.no_grad():
        _flex_warm_and_time(c, rec, r, "flex_untiled", lambda: fn(c.q, c.k, c.v, block_mask=bm), reps)


def section_64(c: Case, rec: Recorder, reps: int, warmup: int) -> None:
    r = rec.row(c.name)
    bs = (64, 64) if c.cuda else (16, 16)
    st = c.layout(bs).stats()
    r.update(full_64x64=st["full"], partial_64x64=st["partial"])
    with perm_mode("copy"):
        rec.put(r, "ours_64x64_copy_ms", _try(lambda: c.time(lambda: c.ours(bs=bs), reps, warmup)))


def _modes_after_fwd(r: Optional[dict], all_modes: bool) -> tuple:
    """copy (the default) plus the fastest forward mode of ``r``; every mode when unknown or ``all_modes``."""
    best = (r or {}).get("best_mode")
    if all_modes or best not in MODES:
        return MODES
    return ("copy",) if best == "copy" else ("copy", best)


def section_fwdbwd(c: Case, rec: Recorder, reps: int, flex: bool = False, all_modes: bool = False) -> None:
    r = rec.row(c.name)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (c.q, c.k, c.v))
    do = torch.randn_like(c.q)

    def fb(fwd):
        def run():
            o = fwd()
            torch.autograd.grad(o, (qg, kg, vg), do)
        return run

    if flex:
        for bs in _flex_blocks(c):
            r["fwd_bwd_flex_block"] = f"{bs[0]}x{bs[1]}"
            _flex_warm_and_time(c, rec, r, "fwd_bwd_flex", fb(lambda: c.ours(qg, kg, vg, bs=bs, backend="flex")),
                                reps)
            if isinstance(r.get("fwd_bwd_flex_ms"), float):
                break
            r[f"fwd_bwd_flex_{bs[0]}x{bs[1]}_error"] = r.get("fwd_bwd_flex_compile_s")
        return
    for nm, fn in sdpa_fns(c.cuda).items():
        rec.put(r, f"fwd_bwd_dense_{nm}_ms", _try(lambda fn=fn: c.time(fb(lambda: fn(qg, kg, vg)), reps, 1)))
    dense = [t for key, t in r.items() if key.startswith("fwd_bwd_dense_") and isinstance(t, float)]
    r["fwd_bwd_dense_ms"] = min(dense) if dense else None
    lay = c.layout(c.auto_bs)
    modes = _modes_after_fwd(r, all_modes) if (lay.perm_q is not None and c.backend == "triton") else ("copy",)
    for mode in modes:
        with perm_mode(mode):
            rec.put(r, f"fwd_bwd_ours_{mode}_ms", _try(lambda: c.time(fb(lambda: c.ours(qg, kg, vg)), reps, 1)))
            t = r[f"fwd_bwd_ours_{mode}_ms"]
            if isinstance(t, float) and r["fwd_bwd_dense_ms"]:
                rec.put(r, f"fwd_bwd_speedup_{mode}_x", r["fwd_bwd_dense_ms"] / t)
    times = [r[f"fwd_bwd_ours_{m}_ms"] for m in modes if isinstance(r.get(f"fwd_bwd_ours_{m}_ms"), float)]
    if times and r["fwd_bwd_dense_ms"]:
        r["fwd_bwd_speedup_x"] = r["fwd_bwd_dense_ms"] / min(times)
        rec.save()


@contextlib.contextmanager
def attention_probe(cuda: bool):
    """Inside the block, every attention call of a model (dense ``F.scaled_dot_product_attention`` or a visattn
    layer call, the outermost one only) is timed (CUDA events: the GPU-timeline span from just before the call's
    first kernel to just after its last; CPU: wall time) and counted, and the block-sparse backend each
    neighborhood call picks is recorded. Yields ``{"spans": [...], "backends": [...]}``; read after a sync."""
    from visattn.adapters.base import LayerCtx
    from visattn.kernels import dispatch
    from visattn.methods import neighborhood as nbm

    rec = {"spans": [], "backends": []}
    depth = [0]

    def timed(fn):
        def wrapper(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            try:
                if cuda:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    out = fn(*a, **k)
                    e.record()
                    rec["spans"].append((s, e))
                else:
                    t0 = time.perf_counter()
                    out = fn(*a, **k)
                    rec["spans"].append((time.perf_counter() - t0) * 1e3)
                return out
            finally:
                depth[0] -= 1
        return wrapper

    def bsa(q, k, v, layout, **kw):
        be = kw.get("backend", "auto")
        rec["backends"].append(dispatch._pick_auto(q, layout, False) if be == "auto" else be)
        return saved_bsa(q, k, v, layout, **kw)

    saved_sdpa, saved_attend, saved_bsa = F.scaled_dot_product_attention, LayerCtx.attend, nbm.block_sparse_attention
    F.scaled_dot_product_attention, LayerCtx.attend = timed(saved_sdpa), timed(saved_attend)
    nbm.block_sparse_attention = bsa
    try:
        yield rec
    finally:
        F.scaled_dot_product_attention, LayerCtx.attend = saved_sdpa, saved_attend
        nbm.block_sparse_attention = saved_bsa


def attention_breakdown(step: Callable[[], object], cuda: bool) -> dict:
    """One extra step with :func:`attention_probe`: attention calls, their summed time (``attn_ms``), the CPU time
    until ``step()`` returns (``host_issue_ms``: the time to enqueue the step; when it is close to the timed step
    the step is host-bound and GPU savings cannot show), the whole step (``step_ms``) and the backends used."""
    if cuda:
        torch.cuda.synchronize()
    with attention_probe(cuda) as rec:
        t0 = time.perf_counter()
        step()
        host = (time.perf_counter() - t0) * 1e3
        if cuda:
            torch.cuda.synchronize()
        total = (time.perf_counter() - t0) * 1e3
    spans = [s.elapsed_time(e) for s, e in rec["spans"]] if cuda else rec["spans"]
    backends = sorted(set(rec["backends"]))
    return {"attn_calls": len(spans), "attn_ms": float(sum(spans)), "host_issue_ms": host, "step_ms": total,
            "block_sparse_calls": len(rec["backends"]), "backends": ",".join(backends) or "-"}


def run_e2e(device: str, dtype, reps: int, rec: Recorder, res_px: int = 2048, all_modes: bool = False) -> None:
    """One denoising step of a tiny-width, full-resolution Flux-style transformer (2048 px -> 128x128 tokens)."""
    import visattn
    from diffusers import FluxTransformer2DModel

    cuda = device == "cuda"
    h = w = res_px // 16 if cuda else 16  # VAE /8, then 2x2 packing
    text = 512 if cuda else 8
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                   attention_head_dim=128, num_attention_heads=4, joint_attention_dim=256,
                                   pooled_projection_dim=64, axes_dims_rope=(16, 56, 56)).to(device, dtype).eval()
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    inp = dict(hidden_states=torch.randn(1, h * w, 64, device=device, dtype=dtype),
               encoder_hidden_states=torch.randn(1, text, 256, device=device, dtype=dtype),
               pooled_projections=torch.randn(1, 64, device=device, dtype=dtype),
               timestep=torch.tensor([0.5], device=device, dtype=dtype),
               img_ids=ids.reshape(h * w, 3), txt_ids=torch.zeros(text, 3, device=device))
    kern = (48, 48) if cuda else (6, 6)
    stride = (16, 16) if cuda else (2, 2)
    out = rec.data["e2e"] if isinstance(rec.data.get("e2e"), dict) else {}
    rec.data["e2e"] = out
    out.update(e2e=f"Flux-style, 2 double + 4 single blocks, 4x128 heads, {h}x{w} image tokens + {text} text "
                   f"(global), one step, no grad", kernel=list(kern), stride=list(stride))

    def step():
        with torch.no_grad():
            return model(**inp).sample

    def measure(tag: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rec.put(out, f"{tag}_ms", _try(lambda: median_ms(step, reps, 1, cuda)), "e2e")
        if cuda:
            out[f"{tag}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if isinstance(out.get(f"{tag}_ms"), float) and isinstance(out.get("dense_ms"), float) and tag != "dense":
            rec.put(out, f"{tag}_speedup_x", out["dense_ms"] / out[f"{tag}_ms"], "e2e")
        # where the step's time goes (one extra, untimed-above step): attention share, host issue time, backends
        br = _try(lambda: attention_breakdown(step, cuda))
        if isinstance(br, dict):
            for key, val in br.items():
                out[f"{tag}_{key}"] = val
            log(f"e2e {tag}: {br}")
            rec.save()
        else:
            rec.put(out, f"{tag}_breakdown", br, "e2e")

    measure("dense")
    configs = [("na", dict(kernel_size=kern)), ("gna", dict(kernel_size=kern, stride=stride)),
               ("flux2k", dict(kernel_size=(64, 64) if cuda else (8, 8), stride=(16, 16) if cuda else (4, 4)))]
    # copy plus the forward mode that won most kernel cases (every mode if that is unknown or with --all-modes)
    bests = [r.get("best_mode") for r in rec.data["kernels"] if r.get("permuted") and r.get("best_mode") in MODES]
    top = max(set(bests), key=bests.count) if bests else None
    modes = _modes_after_fwd({"best_mode": top}, all_modes) if (cuda or _interpreter()) else ("copy",)
    out["modes"] = list(modes)
    for tag, kw in configs:
        with visattn.apply(model, "neighborhood", **kw) as handle:
            step()  # geometries for the block counts (and the layout built before timing)
            geos = [g for g in handle.geometries().values() if g is not None]
            stats = [handle.method.layout_stats(g) for g in geos]
            out[f"{tag}_layout"] = stats[0] if stats and all(st == stats[0] for st in stats) else stats
            for mode in modes:
                with perm_mode(mode):
                    measure(f"{tag}_{mode}")


# ------------------------------------------------------------------------------------------------ stats
def stats_only(cases, top: int = 4) -> list:
    """Exact block counts of the automatic choice and of the best tile candidates, for 128x128 and 128x64."""
    rows = []
    for name, (B, H, shape, D), kernel, stride, target in cases:
        spec = make_spec(shape, kernel, stride=stride)
        auto = nl.auto_block_size(spec, "cuda", D)
        for bs in ((128, 128), (128, 64)):
            chosen = nl.choose_tiles(spec, bs)
            cands = sorted(nl.tile_candidates(spec, bs), key=lambda x: x[0])
            picks = [chosen] + [(t, s) for _, t, s in cands if (t, s) != chosen][:top - 1]
            for tile, sub in picks:
                t0 = time.perf_counter()
                cnt = nl.block_counts(spec, bs, tiles=(tile, sub))
                steps = (cnt["full"] + 1.6 * cnt["partial"]) * bs[0] * bs[1] / (128 * 64)
                rows.append({"case": name, "shape": f"({B}, {H}, {'x'.join(map(str, shape))}, {D})",
                             "kernel": kernel, "stride": stride, "block_m": bs[0], "block_n": bs[1],
                             "tile": "x".join(map(str, tile)), "sub_tile": "x".join(map(str, sub)),
                             "full": cnt["full"], "partial": cnt["partial"], "empty": cnt["empty"],
                             "block_density": cnt["density"], "cost_128x64_steps": steps,
                             "chosen": (tile, sub) == chosen, "auto": (tile, sub) == chosen and bs == auto,
                             "element_density": allowed_pairs(spec) / spec.seq_len ** 2,
                             "classify_cpu_s": time.perf_counter() - t0})
    return rows


def _fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else ""
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, str) and x.startswith(("failed", "skipped")):
        return x.split(":")[0]
    return "-" if x is None else str(x)


def print_table(rows, cols) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    sys.stdout.flush()


FWD_COLS = ["case", "block_m", "block_n", "tile", "sub_tile", "full", "partial", "dense_cudnn_ms", "dense_flash_ms",
            "ours_copy_ms", "ours_fused_ms", "ours_fused_q_ms", "ours_kernel_ms", "permute_ms", "speedup_x",
            "best_mode", "target_x", "useful_tflops", "max_abs_err_vs_fp32"]
ALT_COLS = ["case", "ours_128x128_copy_ms", "ours_128x128_kernel_ms", "ours_128x64_copy_ms", "ours_128x64_kernel_ms",
            "ours_64x64_copy_ms", "hl_dense_cudnn_ms", "hl_ours_copy_ms", "hl_ours_fused_ms", "hl_ours_fused_q_ms",
            "flex_block", "flex_same_layout_ms", "flex_over_ours_x", "flex_same_layout_compile_s", "flex_untiled_ms",
            "flex_untiled_compile_s",
            "layout_build_s"]
BWD_COLS = ["case", "fwd_bwd_dense_cudnn_ms", "fwd_bwd_dense_flash_ms", "fwd_bwd_ours_copy_ms", "fwd_bwd_ours_fused_ms",
            "fwd_bwd_ours_fused_q_ms", "fwd_bwd_speedup_x", "fwd_bwd_flex_block", "fwd_bwd_flex_ms",
            "fwd_bwd_flex_compile_s"]


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="forward only: dense vs ours (copy mode), no extras")
    ap.add_argument("--stats-only", action="store_true", help="block counts and tile candidates, no timing")
    ap.add_argument("--sections", default="", help=f"comma-separated, run in this order: {','.join(SECTIONS)} "
                                                   "(default: all but flex-bwd; --quick: fwd)")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--no-e2e", action="store_true", help="leave out the end-to-end step")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end step")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="skip items that would end after this many seconds from the start (0: no budget)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median), default 5 (CPU: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls before timing, default 2 (CPU: 1)")
    ap.add_argument("--fresh", action="store_true", help="do not merge into an existing JSON")
    ap.add_argument("--all-modes", action="store_true",
                    help="fwdbwd/e2e: every permutation mode (default: copy + the fastest forward mode)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/bench_neighborhood[_quick|_stats|_cpu].json); rewritten after "
                         "every measurement; rows of cases run now are updated in place")
    ap.add_argument("--merge", nargs="+", default=None, help="merge these result JSONs into --out and print them")
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out or os.path.join(HERE, "bench_neighborhood.json"))
        return
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sel = set(filter(None, args.cases.split(",")))
    pick = lambda cs: [c for c in cs if not sel or c[0] in sel]  # noqa: E731
    meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None
            else list(argv)}
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        pass
    if args.stats_only:
        rows = stats_only(pick(CASES))
        print_table(rows, ["case", "block_m", "block_n", "tile", "sub_tile", "full", "partial", "empty",
                           "block_density", "cost_128x64_steps", "chosen", "auto", "element_density"])
        out = args.out or os.path.join(HERE, "bench_neighborhood_stats.json")
        with open(out, "w") as f:
            json.dump({"meta": meta, "layouts": rows}, f, indent=1)
        print(f"wrote {out}")
        return
    if args.e2e_only:
        sections = ["e2e"]
    elif args.sections:
        sections = [s for s in args.sections.split(",") if s]
        bad = [s for s in sections if s not in SECTIONS]
        if bad:
            raise SystemExit(f"unknown sections {bad}; known: {SECTIONS}")
    elif args.quick:
        sections = ["fwd"]
    else:
        sections = [s for s in SECTIONS if s != "flex-bwd" and not (args.no_e2e and s == "e2e")]
    if args.no_e2e and "e2e" in sections and not args.e2e_only:
        sections.remove("e2e")
    sections = [s for s in SECTIONS if s in sections]  # fixed order
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = args.reps or (5 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    suffix = "_quick" if args.quick else ""
    out = args.out or os.path.join(HERE, f"bench_neighborhood{suffix}.json" if cuda else "bench_neighborhood_cpu.json")
    meta.update(quick=args.quick, sections=sections, reps=reps, warmup=warmup, budget_s=args.budget_s)
    rec = Recorder(out, meta, args.fresh, args.budget_s)
    log(f"sections {sections}, cases {[c[0] for c in pick(CASES if cuda else TINY)]}, reps {reps}, warmup {warmup}, "
        f"budget {args.budget_s or 'none'} s, out {out}")
    if any(s.startswith("flex") for s in sections):
        _raise_compile_limits()
    cache: Dict[str, Case] = {}

    def case(spec_row) -> Case:
        name = spec_row[0]
        if name not in cache:
            cache.clear()  # one case's tensors at a time (3-D inputs are 0.7 GB each)
            if cuda:
                torch.cuda.empty_cache()
            cache[name] = Case(*spec_row, device=device, dtype=dtype)
        return cache[name]

    def guarded(section: str, name: str, fn: Callable[[], None]) -> None:
        r = rec.row(name) if section != "e2e" else None
        if not rec.fits(EST[section]):
            if r is not None:
                rec.put(r, f"skipped_{section}", f"skipped: budget ({rec.elapsed():.0f}s used)")
            else:
                log(f"[{rec.elapsed():7.1f}s] e2e skipped: budget")
            return
        t0 = time.perf_counter()
        res = _try(fn)
        if isinstance(res, str):
            if r is not None:
                rec.put(r, f"error_{section}", res)
            else:
                rec.data["e2e"] = dict(rec.data.get("e2e") or {}, error=res)
                log(f"e2e: {res}")
                rec.save()
        if r is not None:
            r[f"wall_{section}_s"] = time.perf_counter() - t0
            rec.save()

    cases = pick(CASES if cuda else TINY)
    na_cases = [c for c in cases if not c[0].endswith("gna")]
    for section in sections:
        log(f"[{rec.elapsed():7.1f}s] == section {section}")
        if section == "fwd":
            for c in cases:
                guarded("fwd", c[0], lambda c=c: section_fwd(case(c), rec, reps, warmup, args.quick))
        elif section == "flex":
            for c in cases:
                guarded("flex", c[0], lambda c=c: section_flex(case(c), rec, reps))
        elif section == "flex-untiled":
            for c in na_cases:
                if c[0] == "1d-na":
                    continue  # 1-D tiles are the original order: same as "flex"
                guarded("flex-untiled", c[0], lambda c=c: section_flex_untiled(case(c), rec, reps))
        elif section == "64x64":
            for c in na_cases:
                guarded("64x64", c[0], lambda c=c: section_64(case(c), rec, reps, warmup))
        elif section == "fwdbwd":
            for c in cases:
                guarded("fwdbwd", c[0], lambda c=c: section_fwdbwd(case(c), rec, max(3, reps - 2),
                                                                    all_modes=args.all_modes))
        elif section == "flex-bwd":
            for c in cases:
                if not cuda:
                    continue  # FlexAttention has no backward on CPU
                guarded("flex-bwd", c[0], lambda c=c: section_fwdbwd(case(c), rec, 3, flex=True))
        elif section == "e2e":
            cache.clear()
            guarded("e2e", "e2e", lambda: run_e2e(device, dtype, reps, rec, all_modes=args.all_modes))
    log(f"[{rec.elapsed():7.1f}s] done")
    print_all(rec.data)
    rec.save()
    print(f"wrote {out}")


def print_all(data: dict) -> None:
    for cols in (FWD_COLS, ALT_COLS, BWD_COLS):
        print()
        print_table(data["kernels"], cols)
    if isinstance(data.get("e2e"), dict):
        e = data["e2e"]
        print()
        print(e.get("e2e"))
        keys = [k[:-3] for k in e if k.endswith("_ms")]
        print_table([{"config": k, "ms": e.get(f"{k}_ms"), "speedup_x": e.get(f"{k}_speedup_x"),
                      "peak_gib": e.get(f"{k}_peak_gib")} for k in keys], ["config", "ms", "speedup_x", "peak_gib"])


def merge(paths, out: str) -> None:
    """Rows of several result files merged per case (later files win per key); e2e dicts merged likewise."""
    data = {"meta": [], "kernels": [], "e2e": None}
    rows: Dict[str, dict] = {}
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        data["meta"].append(d.get("meta"))
        for r in d.get("kernels", []):
            rows.setdefault(r["case"], {}).update(r)
        if isinstance(d.get("e2e"), dict):
            data["e2e"] = dict(data["e2e"] or {}, **d["e2e"])
    order = [c[0] for c in CASES]
    data["kernels"] = sorted(rows.values(), key=lambda x: order.index(x["case"]) if x["case"] in order else 99)
    for r in data["kernels"]:  # cross-file ratios
        if isinstance(r.get("flex_same_layout_ms"), float) and isinstance(r.get("ours_best_ms"), float):
            r["flex_over_ours_x"] = r["flex_same_layout_ms"] / r["ours_best_ms"]
    print_all(data)
    with open(out, "w") as f:
        json.dump(data, f, indent=1, default=str)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
