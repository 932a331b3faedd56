"""Bi-level routing attention benchmark: ours (gather-free, block-sparse) vs the gather path vs dense SDPA.

    python benchmarks/bench_routing.py --quick        # H100: forward only, few repetitions
    python benchmarks/bench_routing.py                # H100: forward and forward+backward
    python benchmarks/bench_routing.py --stats-only   # layout statistics of the benchmark shapes (any device)

Shapes (B, H, grid, D, regions, topk) from issue 5. On a machine without CUDA the timings run on tiny
shapes (a logic check only). Writes JSON (``--out``) and prints a markdown table.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import visattn  # noqa: E402
from visattn.kernels import block_sparse_attention  # noqa: E402
from visattn.methods import _routing_core as core  # noqa: E402
from visattn.methods.routing import bilevel_routing_attention, bilevel_routing_attention_gather  # noqa: E402

SHAPES = [  # (B, H, (h, w), D, num_regions, topk)
    (1, 8, (56, 56), 64, 7, 4),
    (1, 16, (128, 128), 64, 16, 16),
    (1, 24, (256, 256), 128, 32, 32),
]
TINY_SHAPES = [(1, 2, (16, 16), 16, 4, 4), (2, 2, (32, 32), 16, 4, 8), (1, 2, (15, 15), 16, 5, 3)]


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


def _name(shape) -> str:
    B, H, hw, D, S, topk = shape
    return f"({B}, {H}, {hw[0]}x{hw[1]}, {D}) regions {S} topk {topk}"


def _time(fn: Callable[[], object], reps: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of ``fn``."""
    return median_ms(fn, reps, warmup, cuda)


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


def _measure(name: str, fn: Callable[[], object], reps: int, warmup: int, cuda: bool) -> dict:
    try:
        mem = _peak_mib(fn, cuda)
        ms = _time(fn, reps, warmup, cuda)
        return {"ms": ms, "peak_mib": mem}
    except torch.cuda.OutOfMemoryError as e:  # the gather path at large shapes
        torch.cuda.empty_cache()
        return {"ms": None, "peak_mib": None, "error": f"OOM: {str(e).splitlines()[0][:200]}"}


def bench_shape(shape, *, device: str, dtype: torch.dtype, reps: int, warmup: int, backward: bool,
                backend: str) -> dict:
    B, H, hw, D, S, topk = shape
    cuda = device == "cuda"
    N = hw[0] * hw[1]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    kw = dict(spatial_shape=hw, num_regions=S, topk=topk)
    res: Dict[str, object] = {"shape": _name(shape), "B": B, "H": H, "grid": list(hw), "D": D, "num_regions": S,
                              "topk": topk, "tokens": N}
    with torch.no_grad():
        out, routing = bilevel_routing_attention(q, k, v, backend=backend, return_routing=True, **kw)
        grid = core.make_region_grid(hw, S)
        order = core.token_order(grid, 0, N, q.device)
        strategy, block = core.choose_strategy(grid, order.num_work)
        res["strategy"], res["block"] = strategy, block
        if strategy != "dense":
            lay = core.build_layout(routing, order, grid.num_region_total, block, mask_padding=False)
            res["layout"] = {k_: v_ for k_, v_ in lay.stats().items() if k_ in ("full", "partial", "empty", "total",
                                                                                 "density")}
            try:
                from visattn.kernels.dispatch import _pick_auto
                res["backend"] = _pick_auto(q, lay, False) if backend == "auto" else backend
            except Exception:  # pragma: no cover - informational only
                res["backend"] = backend
        # correctness against the gather path fed the same routing (bf16/fp16: loose)
        try:
            ref = bilevel_routing_attention_gather(q, k, v, routing=routing, **kw)
            res["max_abs_diff_vs_gather"] = float((out.float() - ref.float()).abs().max())
            del ref
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            res["max_abs_diff_vs_gather"] = None
        del out
        fwd = {
            "ours": lambda: bilevel_routing_attention(q, k, v, backend=backend, **kw),
            "gather": lambda: bilevel_routing_attention_gather(q, k, v, **kw),
            "dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        }
        if strategy != "dense":
            fwd["ours_kernel_only"] = lambda: block_sparse_attention(q, k, v, lay, backend=backend)
            fwd["ours_routing_and_layout"] = lambda: core.build_layout(
                core.compute_routing(q, k, grid, topk, scale=D ** -0.5), order, grid.num_region_total, block,
                mask_padding=False)
        res["forward"] = {name: _measure(name, fn, reps, warmup, cuda) for name, fn in fwd.items()}
    if backward:
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        go = torch.randn_like(q)

        def fb(f):
            def run():
                o = f(qg, kg, vg)
                o.backward(go)
                qg.grad = kg.grad = vg.grad = None
            return run
        fwdbwd = {
            "ours": fb(lambda a, b, c: bilevel_routing_attention(a, b, c, backend=backend, **kw)),
            "gather": fb(lambda a, b, c: bilevel_routing_attention_gather(a, b, c, **kw)),
            "dense_sdpa": fb(lambda a, b, c: F.scaled_dot_product_attention(a, b, c)),
        }
        res["forward_backward"] = {n: _measure(n, f, max(3, reps // 2), warmup, cuda) for n, f in fwdbwd.items()}
    for part in ("forward", "forward_backward"):
        r = res.get(part)
        if not r or r["ours"].get("ms") is None:
            continue
        for other in ("gather", "dense_sdpa"):
            o = r[other]
            if o.get("ms"):
                r[f"speedup_vs_{other}"] = o["ms"] / r["ours"]["ms"]
            if o.get("peak_mib") and r["ours"].get("peak_mib"):
                r[f"memory_ratio_{other}_over_ours"] = o["peak_mib"] / r["ours"]["peak_mib"]
    del q, k, v
    if cuda:
        torch.cuda.empty_cache()
    return res


def _fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def table(results: List[dict]) -> str:
    lines = ["| shape | pass | ours ms | gather ms | dense SDPA ms | ours MiB | gather MiB | dense MiB | "
             "speedup vs gather | mem gather/ours | layout full/partial/empty |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lay = r.get("layout")
        ls = f"{lay['full']}/{lay['partial']}/{lay['empty']}" if lay else r.get("strategy", "")
        for part in ("forward", "forward_backward"):
            p = r.get(part)
            if not p:
                continue
            lines.append(
                f"| {r['shape']} | {part.replace('_', '+')} | {_fmt(p['ours']['ms'])} | {_fmt(p['gather']['ms'])} | "
                f"{_fmt(p['dense_sdpa']['ms'])} | {_fmt(p['ours']['peak_mib'], 0)} | {_fmt(p['gather']['peak_mib'], 0)} | "
                f"{_fmt(p['dense_sdpa']['peak_mib'], 0)} | {_fmt(p.get('speedup_vs_gather'))} | "
                f"{_fmt(p.get('memory_ratio_gather_over_ours'))} | {ls} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="forward only, fewer repetitions")
    ap.add_argument("--stats-only", action="store_true", help="only layout statistics of the benchmark shapes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--backend", default="auto")
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
    shapes = TINY_SHAPES if (args.tiny or not cuda) else SHAPES
    reps, warmup = (5, 2) if args.quick else (20, 5)
    if not cuda:
        reps, warmup = 2, 1
    results = []
    for s in shapes:
        print(f"benchmarking {_name(s)} ...", flush=True)
        results.append(bench_shape(s, device=args.device, dtype=dtype, reps=reps, warmup=warmup,
                                   backward=not args.quick, backend=args.backend))
    meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "visattn": visattn.__version__, "dtype": args.dtype if cuda else "fp32",
            "mode": "quick" if args.quick else "full", "reps": reps, "warmup": warmup}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    md = table(results)
    print(md)
    default = "bench_routing.json" if cuda and not args.tiny else "bench_routing_cpu.json"
    path = args.out or os.path.join(here, default)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results, "table_md": md}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
