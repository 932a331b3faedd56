"""Bi-level routing attention benchmark: ours (gather-free, block-sparse) vs the gather path vs dense SDPA.

    python benchmarks/bench_routing.py --out r.json            # H100: forward and forward+backward, 3 shapes
    python benchmarks/bench_routing.py --split --out r.json    # + time split (routing, layout, permute, kernel)
    python benchmarks/bench_routing.py --quick --out r.json    # forward only, fewer repetitions
    python benchmarks/bench_routing.py --sweep --out s.json    # small problems: block-sparse vs masked dense
    python benchmarks/bench_routing.py --stats-only            # layout statistics of the benchmark shapes (CPU)
    python benchmarks/bench_routing.py --tiny                  # tiny shapes (a logic check; the default on CPU)

Shapes (B, H, grid, D, regions, topk) from issue 5. Rows:

* ``ours``: ``bilevel_routing_attention`` as a user calls it (``strategy="auto"``: may take the small-problem
  dense fallback, the ``path`` field says which);
* ``ours_sparse``: the block-sparse path forced (``dense_threshold=0``), when ``ours`` took another path;
* ``ours_dense``: the masked dense SDPA path forced (``strategy="dense"``), when its mask fits;
* ``gather``: the faithful re-implementation of the released gather algorithm;
* ``dense_sdpa``: full attention (not the same result).

Timings are medians of CUDA-event intervals around single calls, so host-bound calls are measured as the
host time they take. ``host_ms``: host time per call of ``ours`` when calls are issued back to back without
waiting (the CPU cost). Writes JSON (``--out``) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _timing import median_ms, timed_ms  # noqa: E402

import visattn  # noqa: E402
from visattn.kernels import block_sparse_attention  # noqa: E402
from visattn.methods import _routing_core as core  # noqa: E402
from visattn.methods import _routing_layout as rl  # noqa: E402
from visattn.methods.routing import bilevel_routing_attention, bilevel_routing_attention_gather  # noqa: E402

SHAPES = [  # (B, H, (h, w), D, num_regions, topk)
    (1, 8, (56, 56), 64, 7, 4),
    (1, 16, (128, 128), 64, 16, 16),
    (1, 24, (256, 256), 128, 32, 32),
]
TINY_SHAPES = [(1, 2, (16, 16), 16, 4, 4), (2, 2, (32, 32), 16, 4, 8), (1, 2, (15, 15), 16, 5, 3)]
# small problems for the dense-fallback threshold: (B, H, grid, D, regions, topk)
SWEEP_SHAPES = [
    (1, 8, (28, 28), 64, 7, 4), (1, 8, (56, 56), 64, 7, 4), (4, 8, (56, 56), 64, 7, 4), (16, 8, (56, 56), 64, 7, 4),
    (1, 16, (64, 64), 64, 8, 8), (1, 8, (80, 80), 64, 10, 8), (1, 16, (96, 96), 64, 12, 8),
    (1, 8, (128, 128), 64, 16, 16), (1, 16, (128, 128), 64, 16, 16), (64, 4, (56, 56), 32, 7, 4),
]
TINY_SWEEP = [(1, 2, (16, 16), 16, 4, 2), (2, 2, (32, 32), 16, 4, 4)]
DENSE_MASK_MAX_BYTES = 1 << 30  # ours_dense row only where the (B, 1, N, N) bool mask stays under 1 GiB


def _name(shape) -> str:
    B, H, hw, D, S, topk = shape
    return f"({B}, {H}, {hw[0]}x{hw[1]}, {D}) regions {S} topk {topk}"


def layout_stats(shape) -> dict:
    """Strategy, block size and full/partial/empty block counts for a random routing of ``shape`` (CPU)."""
    B, H, hw, D, S, topk = shape
    grid = core.make_region_grid(hw, S)
    order = core.token_order(grid, 0, hw[0] * hw[1], "cpu")
    strategy, block = core.choose_strategy(grid, order.num_work)
    g = torch.Generator().manual_seed(0)
    R = grid.num_region_total
    routing = torch.stack([torch.stack([torch.randperm(R, generator=g)[:topk] for _ in range(R)]) for _ in range(B)])
    out = {"shape": _name(shape), "strategy": strategy, "block": block, "region_tokens": grid.region_size,
           "tokens": order.num_work, "element_density": topk / R}
    if strategy != "dense":
        t0 = time.perf_counter()
        lay = core.build_layout(routing, order, R, block, mask_padding=False)
        out["layout_build_cpu_ms"] = (time.perf_counter() - t0) * 1e3
        out.update({k: v for k, v in lay.stats().items() if k in ("full", "partial", "empty", "total", "density")})
    return out


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _peak_mib(fn: Callable[[], object], cuda: bool) -> Optional[float]:
    """Peak memory above what was allocated before the call (MiB); None on CPU."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _host_ms(fn: Callable[[], object], n: int, cuda: bool) -> float:
    """Host time per call, calls issued back to back (the GPU may lag behind; synchronised only at the end)."""
    _sync(cuda)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    _sync(cuda)
    return (t1 - t0) * 1e3 / n


TIME_BUDGET_S = 0.3  # per measurement: fast (host-bound) calls get more repetitions, so host jitter averages out
MAX_REPS = 200


def _stats(fn: Callable[[], object], reps: int, warmup: int, cuda: bool) -> dict:
    """Median / min / p20 ms over at least ``reps`` timed calls (more for fast calls, up to TIME_BUDGET_S)."""
    t0 = time.perf_counter()
    median_ms(fn, 1, warmup, cuda)
    per_call = (time.perf_counter() - t0) / (warmup + 1)
    n = max(reps, min(MAX_REPS, int(TIME_BUDGET_S / max(per_call, 1e-6))))
    times = sorted(timed_ms(fn, n, cuda))
    return {"ms": times[len(times) // 2], "min_ms": times[0], "p20_ms": times[len(times) // 5], "reps": n}


def _measure(fn: Callable[[], object], reps: int, warmup: int, cuda: bool, mem: bool = True) -> dict:
    try:
        peak = _peak_mib(fn, cuda) if mem else None
        return {**_stats(fn, reps, warmup, cuda), "peak_mib": peak}
    except torch.cuda.OutOfMemoryError as e:  # the gather path at large shapes
        torch.cuda.empty_cache()
        return {"ms": None, "peak_mib": None, "error": f"OOM: {str(e).splitlines()[0][:200]}"}


def _warm_gpu(cuda: bool, seconds: float = 1.0) -> None:
    """Bring the clocks up before the first timing (an idle H100 starts far below its boost clock)."""
    if not cuda:
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
    del a


def _path(shape, device: str, threshold: Optional[int] = None) -> str:
    B, H, hw, D, S, topk = shape
    grid = core.make_region_grid(hw, S)
    nw = core.token_order(grid, 0, hw[0] * hw[1], "cpu").num_work
    if threshold is None:
        threshold = core.DENSE_SCORES_THRESHOLD if device == "cuda" else 0
    path, block, _ = core._choose(grid, nw, "auto", None, B * H, threshold, B)
    return path


def bench_shape(shape, *, device: str, dtype: torch.dtype, reps: int, warmup: int, backward: bool, backend: str,
                split: bool, gather: bool = True, dense: bool = True) -> dict:
    B, H, hw, D, S, topk = shape
    cuda = device == "cuda"
    N = hw[0] * hw[1]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    kw = dict(spatial_shape=hw, num_regions=S, topk=topk)
    grid = core.make_region_grid(hw, S)
    path = _path(shape, device)
    res: Dict[str, object] = {"shape": _name(shape), "B": B, "H": H, "grid": list(hw), "D": D, "num_regions": S,
                              "topk": topk, "tokens": N, "path": path,
                              "dense_scores": B * H * N * N, "dense_threshold": core.DENSE_SCORES_THRESHOLD}
    sparse_strategy, block = core.choose_strategy(grid, N, "auto")
    res["sparse_strategy"], res["block"] = sparse_strategy, block
    mask_fits = B * N * N <= DENSE_MASK_MAX_BYTES
    with torch.no_grad():
        out, routing = bilevel_routing_attention(q, k, v, backend=backend, return_routing=True, **kw)
        if sparse_strategy != "dense":
            lay = core.build_layout(routing, core.token_order(grid, 0, N, q.device), grid.num_region_total, block,
                                    mask_padding=False)
            res["layout"] = {k_: v_ for k_, v_ in lay.stats().items()
                             if k_ in ("full", "partial", "empty", "total", "density")}
            del lay
        if gather:  # correctness against the gather path fed the same routing (bf16/fp16: loose)
            try:
                ref = bilevel_routing_attention_gather(q, k, v, routing=routing, **kw)
                res["max_abs_diff_vs_gather"] = float((out.float() - ref.float()).abs().max())
                if path != "aligned" and sparse_strategy != "dense":
                    o2 = bilevel_routing_attention(q, k, v, backend=backend, dense_threshold=0, routing=routing, **kw)
                    res["max_abs_diff_sparse_vs_gather"] = float((o2.float() - ref.float()).abs().max())
                    del o2
                del ref
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                res["max_abs_diff_vs_gather"] = None
        del out

    def variants(a, b, c):
        fns = {"ours": lambda: bilevel_routing_attention(a, b, c, backend=backend, **kw)}
        if path == "dense" and sparse_strategy != "dense":
            fns["ours_sparse"] = lambda: bilevel_routing_attention(a, b, c, backend=backend, dense_threshold=0, **kw)
        if path != "dense" and mask_fits:
            fns["ours_dense"] = lambda: bilevel_routing_attention(a, b, c, strategy="dense", **kw)
        if gather:
            fns["gather"] = lambda: bilevel_routing_attention_gather(a, b, c, **kw)
        if dense:
            fns["dense_sdpa"] = lambda: F.scaled_dot_product_attention(a, b, c)
        return fns

    with torch.no_grad():
        fwd = {n: _measure(f, reps, warmup, cuda) for n, f in variants(q, k, v).items()}
        fwd["ours"]["host_ms"] = _host_ms(variants(q, k, v)["ours"], max(reps, 10), cuda)
    res["forward"] = fwd
    if backward:
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        go = torch.randn_like(q)

        def fb(f):
            def run():
                o = f()
                o.backward(go)
                qg.grad = kg.grad = vg.grad = None
            return run
        res["forward_backward"] = {n: _measure(fb(f), max(3, reps // 2), max(1, warmup // 2), cuda)
                                   for n, f in variants(qg, kg, vg).items()}
        del qg, kg, vg, go
    if split and sparse_strategy != "dense":
        res["split"] = time_split(q, k, v, grid, topk, block, backend=backend, reps=reps, warmup=warmup, cuda=cuda)
    for part in ("forward", "forward_backward"):
        r = res.get(part)
        if not r:
            continue
        for mine in ("ours", "ours_sparse"):
            if mine not in r or r[mine].get("ms") is None:
                continue
            suffix = "" if mine == "ours" else "_sparse"
            for other in ("gather", "dense_sdpa"):
                o = r.get(other, {})
                if o.get("ms"):
                    r[f"speedup{suffix}_vs_{other}"] = o["ms"] / r[mine]["ms"]
                if o.get("peak_mib") and r[mine].get("peak_mib"):
                    r[f"memory_ratio_{other}_over_ours{suffix}"] = o["peak_mib"] / r[mine]["peak_mib"]
    del q, k, v
    if cuda:
        torch.cuda.empty_cache()
    return res


def time_split(q, k, v, grid, topk: int, block: int, *, backend: str, reps: int, warmup: int, cuda: bool) -> dict:
    """Each stage of the block-sparse path timed on its own (median ms; host-bound stages count their host time)."""
    B, H, N, D = q.shape
    scale = D ** -0.5
    plan = rl.get_plan(grid, 0, N, block, mask_padding=False, device=q.device)
    routing = core.compute_routing(q, k, grid, topk, scale=scale)
    layout = rl.direct_layout(plan, routing) if plan.aligned else rl.packed_layout(plan, routing)
    qp, kp, vp = plan.permute_in(q), plan.permute_in(k), plan.permute_in(v)
    op = block_sparse_attention(qp, kp, vp, layout, scale=scale, backend=backend)
    stages = {
        "routing": lambda: core.compute_routing(q, k, grid, topk, scale=scale),
        "layout": (lambda: rl.direct_layout(plan, routing)) if plan.aligned else (lambda: rl.packed_layout(plan, routing)),
        "permute_in_qkv": lambda: (plan.permute_in(q), plan.permute_in(k), plan.permute_in(v)),
        "kernel": lambda: block_sparse_attention(qp, kp, vp, layout, scale=scale, backend=backend),
        "permute_out": lambda: plan.permute_out(op),
    }
    if plan.aligned:
        stages["backward_lists"] = lambda: rl.direct_transposed(plan, routing)
    with torch.no_grad():
        out = {n: _stats(f, reps, warmup, cuda)["ms"] for n, f in stages.items()}
        out["sum_forward_stages"] = sum(v_ for n, v_ in out.items() if n != "backward_lists")
        e2e = lambda: bilevel_routing_attention(q, k, v, spatial_shape=(grid.height, grid.width),  # noqa: E731
                                                num_regions=grid.num_regions, topk=topk, backend=backend,
                                                dense_threshold=0)
        out["end_to_end"] = _stats(e2e, reps, warmup, cuda)["ms"]
        out["kernel_host_ms"] = _host_ms(stages["kernel"], max(reps, 10), cuda)
    if cuda:  # device time of the kernel alone, launch cost excluded (CUDA graph replay)
        try:
            with torch.no_grad():
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        block_sparse_attention(qp, kp, vp, layout, scale=scale, backend=backend)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    block_sparse_attention(qp, kp, vp, layout, scale=scale, backend=backend)
                out["kernel_device_ms"] = _stats(graph.replay, reps, warmup, cuda)["ms"]
                del graph
        except Exception as e:  # informational only
            out["kernel_device_ms"] = None
            out["kernel_device_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def sweep(shapes, *, device: str, dtype: torch.dtype, reps: int, warmup: int, backend: str) -> List[dict]:
    """Block-sparse (dense_threshold=0) vs masked dense (strategy='dense') on small problems, fwd and fwd+bwd."""
    cuda = device == "cuda"
    rows = []
    for shape in shapes:
        B, H, hw, D, S, topk = shape
        N = hw[0] * hw[1]
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        kw = dict(spatial_shape=hw, num_regions=S, topk=topk, backend=backend)
        row = {"shape": _name(shape), "dense_scores": B * H * N * N, "tokens": N}
        fns = {"sparse": lambda a, b, c: bilevel_routing_attention(a, b, c, dense_threshold=0, **kw),
               "masked_dense": lambda a, b, c: bilevel_routing_attention(a, b, c, strategy="dense", **kw)}
        with torch.no_grad():
            for n, f in fns.items():
                row[f"fwd_{n}_ms"] = _stats(lambda f=f, a=(q, k, v): f(*a), reps, warmup, cuda)["ms"]
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        go = torch.randn_like(q)
        for n, f in fns.items():
            def run(f=f, ins=(qg, kg, vg), go=go):
                f(*ins).backward(go)
                for t in ins:
                    t.grad = None
            row[f"fwdbwd_{n}_ms"] = _stats(run, max(3, reps // 2), max(1, warmup // 2), cuda)["ms"]
        row["fwd_dense_faster"] = row["fwd_masked_dense_ms"] < row["fwd_sparse_ms"]
        row["fwdbwd_dense_faster"] = row["fwdbwd_masked_dense_ms"] < row["fwdbwd_sparse_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, qg, kg, vg, go
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def table(results: List[dict]) -> str:
    lines = ["| shape | pass | path | ours ms | ours (sparse) ms | gather ms | dense SDPA ms | ours MiB | gather MiB | "
             "speedup vs gather | mem gather/ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for part in ("forward", "forward_backward"):
            p = r.get(part)
            if not p:
                continue
            sp = p.get("ours_sparse", {}).get("ms")
            lines.append(
                f"| {r['shape']} | {part.replace('_', '+')} | {r['path']} | {_fmt(p['ours']['ms'])} | {_fmt(sp)} | "
                f"{_fmt(p.get('gather', {}).get('ms'))} | {_fmt(p.get('dense_sdpa', {}).get('ms'))} | "
                f"{_fmt(p['ours']['peak_mib'], 0)} | {_fmt(p.get('gather', {}).get('peak_mib'), 0)} | "
                f"{_fmt(p.get('speedup_vs_gather'))} | {_fmt(p.get('memory_ratio_gather_over_ours'))} |")
    split = [r for r in results if r.get("split")]
    if split:
        names = ["routing", "layout", "permute_in_qkv", "kernel", "permute_out", "sum_forward_stages", "end_to_end",
                 "kernel_device_ms", "backward_lists"]
        lines += ["", "| shape | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in split:
            lines.append(f"| {r['shape']} | " + " | ".join(_fmt(r["split"].get(n), 3) for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="forward only, fewer repetitions")
    ap.add_argument("--split", action="store_true", help="also time each stage (routing, layout, permute, kernel)")
    ap.add_argument("--sweep", action="store_true", help="small problems: block-sparse vs masked dense (threshold)")
    ap.add_argument("--stats-only", action="store_true", help="only layout statistics of the benchmark shapes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, --quick 5)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the default on CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/bench_routing[_cpu|_layouts].json)")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    if args.stats_only:
        stats = [layout_stats(s) for s in SHAPES]
        for s in stats:
            print(json.dumps(s))
        path = args.out or os.path.join(here, "bench_routing_layouts.json")
        with open(path, "w") as f:
            json.dump({"layouts": stats}, f, indent=2)
        print(f"wrote {path}")
        return 0
    cuda = args.device == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if not cuda and dtype != torch.float32:
        dtype = torch.float32
    tiny = args.tiny or not cuda
    reps, warmup = (5, 2) if args.quick else (20, 5)
    if args.reps:
        reps = args.reps
    if not cuda:
        reps, warmup = 2, 1
    meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "visattn": visattn.__version__, "dtype": args.dtype if cuda else "fp32",
            "mode": "quick" if args.quick else "full", "split": args.split, "reps": reps, "warmup": warmup,
            "dense_scores_threshold": core.DENSE_SCORES_THRESHOLD,
            "date": time.strftime("%Y-%m-%d")}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    t_start = time.perf_counter()
    _warm_gpu(cuda)
    doc: Dict[str, object] = {"meta": meta}
    if args.sweep:
        doc["sweep"] = sweep(TINY_SWEEP if tiny else SWEEP_SHAPES, device=args.device, dtype=dtype, reps=reps,
                             warmup=warmup, backend=args.backend)
    else:
        results = []
        for s in (TINY_SHAPES if tiny else SHAPES):
            print(f"benchmarking {_name(s)} ...", flush=True)
            results.append(bench_shape(s, device=args.device, dtype=dtype, reps=reps, warmup=warmup,
                                       backward=not args.quick, backend=args.backend, split=args.split))
        md = table(results)
        print(md)
        doc.update(results=results, table_md=md)
    meta["wall_s"] = time.perf_counter() - t_start
    default = "bench_routing.json" if cuda and not tiny else "bench_routing_cpu.json"
    path = args.out or os.path.join(here, default)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {path} ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
