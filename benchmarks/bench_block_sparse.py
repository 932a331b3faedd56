"""Block-sparse attention benchmark (issue 3): our Triton kernel vs FlexAttention vs dense SDPA (cuDNN, flash)
vs xformers (where importable), forward and backward, bf16, on layouts of given block density.

    python benchmarks/bench_block_sparse.py --out benchmarks/results/block_sparse_h100.json
    python benchmarks/bench_block_sparse.py --tune --out tune.json        # num_warps/stages/tile sweep
    python benchmarks/bench_block_sparse.py --quick                         # a few points

FLOPs: forward 4*B*H*Nq*Nk*D (dense-equivalent); useful = the same times the kept-block fraction;
backward 2.5x forward. Times are medians of ``triton.testing.do_bench`` (CUDA events).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

try:
    from visattn.kernels import BlockLayout, block_sparse_attention
    from visattn.kernels import triton_backend as tb
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from kernels import BlockLayout, block_sparse_attention  # type: ignore
    from kernels import triton_backend as tb  # type: ignore

# most informative first (a time budget may cut the tail)
SHAPES = [(1, 24, 16384, 64), (1, 24, 65536, 128), (2, 16, 8192, 128), (1, 24, 4096, 64), (1, 24, 115200, 128)]
DENSITIES = [0.5, 0.25, 0.10, 0.05]
BLOCK = (128, 128)


def log(*a):
    print(*a, flush=True)


def make_layout(kind: str, density: float, H: int, N: int, bs=BLOCK, device="cuda", seed=0) -> BlockLayout:
    """dense | random (per head, exactly round(density * nKB) blocks a row) | banded -- all FULL blocks.

    Banded layouts are stored per head (identical rows) so random and banded share FlexAttention's compile."""
    nqb, nkb = math.ceil(N / bs[0]), math.ceil(N / bs[1])
    if kind == "dense":
        bm = torch.ones(1, 1, nqb, nkb, dtype=torch.bool, device=device)
    elif kind == "random":
        g = torch.Generator(device=device).manual_seed(seed)
        keep = max(1, round(density * nkb))
        r = torch.rand(1, H, nqb, nkb, generator=g, device=device)
        thr = r.topk(keep, dim=-1).values[..., -1:]
        bm = r >= thr  # exactly `keep` blocks per row
    elif kind == "banded":
        keep = max(1, round(density * nkb))
        qb = torch.arange(nqb, device=device).view(-1, 1)
        start = (qb - keep // 2).clamp(0, nkb - keep)
        kb = torch.arange(nkb, device=device).view(1, -1)
        bm = ((kb >= start) & (kb < start + keep)).view(1, 1, nqb, nkb).expand(1, H, nqb, nkb).contiguous()
    elif kind == "band_elem":  # element band |q - k| <= w: FULL blocks inside, PARTIAL blocks on its edges
        w = int(density * N / 2)
        return BlockLayout.from_mask_mod(lambda b, h, q, k: (q - k).abs() <= w, batch=None, heads=None,
                                         seq_lens=N, block_size=bs, device=device)
    else:
        raise ValueError(f"kind must be dense|random|banded|band_elem, got {kind!r}")
    return BlockLayout.from_block_mask(bm, block_size=bs, seq_lens=N)


def bench(fn, warmup=25, rep=100) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def run_sdpa(q, k, v, backend_name: str, grad: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    with sdpa_kernel([be]):
        if not grad:
            return bench(lambda: F.scaled_dot_product_attention(q, k, v))
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qg, kg, vg)
        go = torch.randn_like(out)
        return bench(lambda: torch.autograd.grad(out, (qg, kg, vg), go, retain_graph=True))


def time_backend(q, k, v, lay, backend: str, grad: bool) -> float:
    if not grad:
        with torch.no_grad():
            block_sparse_attention(q, k, v, lay, backend=backend)
            return bench(lambda: block_sparse_attention(q, k, v, lay, backend=backend))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(qg, kg, vg, lay, backend=backend)
    go = torch.randn_like(out)
    return bench(lambda: torch.autograd.grad(out, (qg, kg, vg), go, retain_graph=True))


def inputs(B, H, N, D, dtype=torch.bfloat16):
    g = lambda: torch.randn(B, H, N, D, device="cuda", dtype=dtype)  # noqa: E731
    return g(), g(), g()


# ---------------------------------------------------------------------------------------------- tuning
FWD_VARIANTS = [
    dict(TM=128, TN=128, num_warps=8, num_stages=3, tma=True),
    dict(TM=128, TN=128, num_warps=4, num_stages=3, tma=True),
    dict(TM=128, TN=64, num_warps=4, num_stages=3, tma=True),
    dict(TM=128, TN=64, num_warps=8, num_stages=2, tma=True),
    dict(TM=64, TN=64, num_warps=4, num_stages=3, tma=True),
]


def tune(results: dict, shapes, deadline: float) -> None:
    """Forward sweep of tile / warps / stages / TMA per head dim: the best on the dense layout becomes "fwd",
    the best on a 10% random layout (short rows) "fwd_short". Backward keeps the table from an earlier sweep
    (results 'tune_bwd' in the JSON: dq and dkdv 64x64 tiles, 4 warps, 2 stages were best at D=128)."""
    for (B, H, N, D) in shapes:
        q, k, v = inputs(B, H, N, D)
        key = f"{B}x{H}x{N}x{D}"
        for kname, kind, dens in (("fwd", "dense", 1.0), ("fwd_short", "random", 0.10)):
            lay = make_layout(kind, dens, H, N)
            flops = 4 * B * H * N * N * D * lay.density()
            best = None
            for var in FWD_VARIANTS:
                if time.time() > deadline:
                    log("tuning stopped: time budget")
                    return
                tb.CONFIG_OVERRIDES[(kname, None, None, D, None)] = var
                try:
                    ms = time_backend(q, k, v, lay, "triton", False)
                except Exception as e:  # a variant that fails to compile is skipped, with its reason
                    log(f"tune {kname} {key} {var} FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                log(f"tune {kname} {key} {kind} {var} {ms:.3f} ms useful {tflops(flops, ms):.0f} TF/s")
                results.setdefault("tune", []).append(dict(kernel=kname, shape=key, pattern=kind, cfg=var, ms=ms,
                                                           useful_tflops=tflops(flops, ms)))
                if best is None or ms < best[0]:
                    best = (ms, var)
            if best:
                tb.CONFIG_OVERRIDES[(kname, None, None, D, None)] = best[1]
                results.setdefault("chosen", {})[f"{kname}_d{D}"] = best[1]
        del q, k, v
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- benchmark
def benchmark(results: dict, shapes, densities, kinds, flex_points, bwd_max_n: int, deadline: float,
              save=lambda: None, flex_bwd_max_n: int = 16384, sdpa=True) -> None:
    rows = results.setdefault("rows", [])
    from visattn.kernels.xformers_backend import xformers_available  # noqa: F401
    for (B, H, N, D) in shapes:
        q, k, v = inputs(B, H, N, D)
        flops = 4 * B * H * N * N * D
        shape = f"({B}, {H}, {N}, {D})"
        if sdpa:
            for name in ("cudnn", "flash"):
                for grad in (False, True):
                    if grad and N > bwd_max_n:
                        continue
                    try:
                        ms = run_sdpa(q, k, v, name, grad)
                        f = flops * (2.5 if grad else 1)
                        rows.append(dict(shape=shape, impl=f"sdpa-{name}", pass_="bwd" if grad else "fwd",
                                         pattern="dense", density=1.0, ms=ms, dense_tflops=tflops(f, ms),
                                         useful_tflops=tflops(f, ms)))
                        log(f"{shape} sdpa-{name} {'bwd' if grad else 'fwd'} {ms:.3f} ms {tflops(f, ms):.0f} TF/s")
                    except Exception as e:
                        log(f"{shape} sdpa-{name} failed: {type(e).__name__}: {str(e)[:200]}")
        points = ([("dense", 1.0)] if sdpa else []) + [(kd, d) for kd in kinds for d in densities]
        for kind, dens in points:
            if time.time() > deadline:
                log(f"{shape} {kind} {dens}: skipped (time budget)")
                results.setdefault("skipped", []).append(f"{shape} {kind} {dens}")
                continue
            lay = make_layout(kind, dens, H, N)
            real = lay.density()
            impls = ["triton"]
            if (kind, dens) in flex_points or ("*", dens) in flex_points:
                impls.append("flex")
            from visattn.kernels.dispatch import BACKENDS
            if "xformers" in BACKENDS and BACKENDS["xformers"].probe(q, lay, False) is None:
                impls.append("xformers")
            for impl in impls:
                for grad in (False, True):
                    if grad and (N > bwd_max_n or impl == "xformers" or (impl == "flex" and N > flex_bwd_max_n)):
                        continue
                    try:
                        t0 = time.time()
                        ms = time_backend(q, k, v, lay, impl, grad)
                        f = flops * (2.5 if grad else 1)
                        row = dict(shape=shape, impl=impl, pass_="bwd" if grad else "fwd", pattern=kind,
                                   density=real, ms=ms, dense_tflops=tflops(f, ms), useful_tflops=tflops(f * real, ms),
                                   wall_s=time.time() - t0)
                        rows.append(row)
                        log(f"{shape} {impl:8s} {row['pass_']} {kind:6s} d={real:.3f} {ms:9.3f} ms "
                            f"dense-eq {row['dense_tflops']:6.0f} useful {row['useful_tflops']:6.0f} TF/s")
                    except Exception as e:
                        log(f"{shape} {impl} {kind} {dens} failed: {type(e).__name__}: {str(e)[:300]}")
                        results.setdefault("errors", []).append(f"{shape} {impl} {kind} {dens}: {e!r}"[:500])
            del lay
            save()
        del q, k, v
        torch.cuda.empty_cache()


def permutation_cost(results: dict, B=1, H=24, N=16384, D=64) -> None:
    """Dispatcher gather/scatter copies for a permuted layout vs the kernel alone (10% banded)."""
    q, k, v = inputs(B, H, N, D)
    lay = make_layout("banded", 0.10, H, N)
    perm = torch.randperm(N, device="cuda")
    lay_p = BlockLayout(lay.seq_len_q, lay.seq_len_k, lay.block_m, lay.block_n, lay.full_counts, lay.full_indices,
                        lay.partial_counts, lay.partial_indices, lay.partial_mask_ids, lay.mask_table, perm, perm)
    saved = tb.FUSE_PERMUTATION
    try:
        with torch.no_grad():
            a = time_backend(q, k, v, lay, "triton", False)
            tb.FUSE_PERMUTATION = False  # gather/scatter copies around the kernel
            b = time_backend(q, k, v, lay_p, "triton", False)
            tb.FUSE_PERMUTATION = True  # gathers/scatters inside the kernel (pointer loads, no TMA)
            c = time_backend(q, k, v, lay_p, "triton", False)
    finally:
        tb.FUSE_PERMUTATION = saved
    results["permutation"] = dict(shape=f"({B}, {H}, {N}, {D})", kernel_ms=a, with_permutation_ms=b,
                                  overhead=(b - a) / a, fused_ms=c, fused_overhead=(c - a) / a)
    log(f"permutation overhead: kernel {a:.3f} ms, with gather/scatter {b:.3f} ms ({100 * (b - a) / a:.0f}%), "
        f"fused in the kernel {c:.3f} ms ({100 * (c - a) / a:.0f}%)")


def markdown(results: dict) -> str:
    lines = ["| shape | pass | pattern | density | impl | ms | dense-eq TF/s | useful TF/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results.get("rows", []):
        lines.append(f"| {r['shape']} | {r['pass_']} | {r['pattern']} | {r['density']:.2f} | {r['impl']} | "
                     f"{r['ms']:.3f} | {r['dense_tflops']:.0f} | {r['useful_tflops']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/block_sparse_h100.json")
    ap.add_argument("--tune", action="store_true", help="sweep forward kernel configs first")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--quick", action="store_true", help="two shapes, densities 1.0/0.1")
    ap.add_argument("--bwd-max-n", type=int, default=16384, help="skip backward above this length")
    ap.add_argument("--flex-bwd-max-n", type=int, default=16384, help="skip flex backward above this length")
    ap.add_argument("--perm", action="store_true", help="measure the dispatcher's permutation copies")
    ap.add_argument("--partial", action="store_true", help="only the element-band (PARTIAL-block) points")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new points after this many s")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 2
    t0 = time.time()
    deadline = t0 + args.budget_s
    torch._dynamo.config.cache_size_limit = 256  # flex recompiles per layout shape (benchmark only)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=__import__("triton").__version__, block=BLOCK, dtype="bfloat16")
    from visattn.kernels.xformers_backend import xformers_available
    results["xformers"] = xformers_available() or "available"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        results["wall_s"] = time.time() - t0
        results["configs"] = {f"{k[0]}_d{k[3]}": v for k, v in tb.CONFIG_OVERRIDES.items()}
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    try:
        if args.tune:
            tune(results, [(1, 24, 16384, 64), (1, 24, 16384, 128)] if not args.quick else [(1, 24, 8192, 128)],
                 deadline)
            log("chosen", json.dumps(results.get("chosen")))
            save()
        if args.perm:
            permutation_cost(results)
        if not args.no_bench:
            if args.partial:
                benchmark(results, [(1, 24, 16384, 64), (1, 24, 65536, 128)], [0.10], ["band_elem"],
                          {("band_elem", 0.10)}, 16384, deadline, save, 16384, sdpa=False)
            elif args.quick:
                benchmark(results, [(1, 24, 16384, 64), (1, 24, 16384, 128)], [0.10], ["random", "banded"],
                          {("random", 0.10), ("banded", 0.10)}, args.bwd_max_n, deadline, save)
            else:
                flex_pts = {("random", 0.10), ("banded", 0.10), ("random", 0.5)}
                benchmark(results, SHAPES, DENSITIES, ["random", "banded"], flex_pts, args.bwd_max_n, deadline,
                          save, args.flex_bwd_max_n)
    except Exception:
        results.setdefault("errors", []).append(traceback.format_exc()[-2000:])
        log(traceback.format_exc())
    save()
    md = markdown(results)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md + "\n")
    log(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
