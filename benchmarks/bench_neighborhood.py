"""Neighborhood attention benchmark (issue 4): ours (Triton, block-sparse, tiled) vs dense SDPA and FlexAttention.

    python benchmarks/bench_neighborhood.py --quick        # H100: forward, few repetitions, no end-to-end
    python benchmarks/bench_neighborhood.py                # H100: + forward+backward, Flex baselines, end to end
    python benchmarks/bench_neighborhood.py --stats-only   # block counts of the issue's shapes (any device)
    python benchmarks/bench_neighborhood.py --cases 3d-na,3d-gna --no-e2e   # split a full run (results merge)
    python benchmarks/bench_neighborhood.py --e2e-only

Every "ours" time includes the token permutation (gather in, inverse gather out); the kernel alone and the
permutation alone are reported too. Layout build time (first call, then cached) is reported separately.
On a machine without CUDA the timings run on tiny shapes (a logic check only). Writes JSON and prints a
markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from visattn.functional import neighborhood_attention  # noqa: E402
from visattn.kernels import block_sparse_attention  # noqa: E402
from visattn.methods import _na_layout as nl  # noqa: E402
from visattn.methods._na_mask import axis_windows, make_mask_mod  # noqa: E402
from visattn.methods.neighborhood import make_spec  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
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


def allowed_pairs(spec) -> int:
    """Number of kept (query, key) grid pairs: separable over axes."""
    total = 1
    for L, k, d, s, c in zip(spec.shape, spec.kernel, spec.dilation, spec.stride, spec.causal):
        _, _, lo, hi = axis_windows(L, k, d, s, c)
        total *= int((hi - lo + 1).sum())
    return total


def _time(fn: Callable[[], object], reps: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of ``fn``."""
    return median_ms(fn, reps, warmup, cuda)


def _try(fn: Callable[[], float]) -> object:
    try:
        return fn()
    except Exception as e:  # record, keep going: one failing baseline must not lose the other figures
        return f"failed: {type(e).__name__}: {str(e)[:200]}"


def dense_fn(q, k, v, cuda: bool) -> Dict[str, Callable]:
    """Dense baselines: cuDNN and flash SDPA separately on CUDA, plain SDPA elsewhere."""
    if not cuda:
        return {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(backend):
        def fn():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return fn

    return {"cudnn": make(SDPBackend.CUDNN_ATTENTION), "flash": make(SDPBackend.FLASH_ATTENTION)}


def run_case(name, dims, kernel, stride, target, *, reps: int, warmup: int, device: str, dtype, full: bool) -> dict:
    B, H, shape, D = dims
    cuda = device == "cuda"
    spec = make_spec(shape, kernel, stride=stride)
    N = spec.seq_len
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    kw = dict(spatial_shape=shape, kernel_size=kernel, stride=stride)
    res: Dict[str, object] = {"case": name, "shape": f"({B}, {H}, {'x'.join(map(str, shape))}, {D})",
                              "kernel": kernel, "stride": stride, "target_x": target}
    bs = nl.default_block_size(torch.device(device), D)
    t0 = time.perf_counter()
    layout = nl.get_layout(spec, bs, device)
    korder = nl.get_layout(spec, bs, device, kernel_order=True)
    if cuda:
        torch.cuda.synchronize()
    res["layout_build_s"] = time.perf_counter() - t0
    st = layout.stats()
    res.update(block_m=bs[0], block_n=bs[1], tile=list(layout._cache.get("tile", ())), full=st["full"],
               partial=st["partial"], empty=st["empty"], block_density=st["density"],
               mask_table_mb=layout.mask_table.numel() * 4 / 2**20)
    pairs = allowed_pairs(spec) * B * H
    res["element_density"] = pairs / (B * H * N * N)
    backend = "triton" if cuda else "sdpa"

    for nm, fn in dense_fn(q, k, v, cuda).items():
        res[f"dense_{nm}_ms"] = _try(lambda fn=fn: _time(fn, reps, warmup, cuda))
    dense_times = [t for key, t in res.items() if key.startswith("dense_") and isinstance(t, float)]
    res["dense_ms"] = min(dense_times) if dense_times else None

    ours = lambda: neighborhood_attention(q, k, v, backend=backend, **kw)  # noqa: E731
    res["ours_ms"] = _try(lambda: _time(ours, reps, warmup, cuda))
    qp, kp, vp = (t.index_select(2, layout.perm_q) for t in (q, k, v))
    res["ours_kernel_ms"] = _try(lambda: _time(lambda: block_sparse_attention(qp, kp, vp, korder, backend=backend),
                                               reps, warmup, cuda))
    inv = layout.inv_perm_q
    res["permute_ms"] = _try(lambda: _time(lambda: [t.index_select(2, layout.perm_q) for t in (q, k, v)]
                                           + [qp.index_select(2, inv)], reps, warmup, cuda))
    if isinstance(res["ours_ms"], float):
        res["useful_tflops"] = 4 * pairs * D / (res["ours_ms"] * 1e-3) / 1e12
        if res["dense_ms"]:
            res["speedup_x"] = res["dense_ms"] / res["ours_ms"]
    # correctness on sampled query rows against an fp32 reference of those rows
    with torch.no_grad():
        out = neighborhood_attention(q, k, v, backend=backend, **kw)
        rows = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:64].to(device)
        mm = make_mask_mod(spec, device)
        mask = mm(0, 0, rows[:, None], torch.arange(N, device=device)[None, :])
        s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * D ** -0.5
        ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.float()
        res["max_abs_err_vs_fp32"] = float((out[:, :, rows].float() - ref).abs().max())
    if full:
        if cuda and bs != (128, 64):  # the other block shape the Triton kernel runs well (64-wide key steps)
            res["ours_128x64_ms"] = _try(lambda: _time(
                lambda: neighborhood_attention(q, k, v, backend=backend, block_size=(128, 64), **kw),
                reps, warmup, cuda))
            st64 = nl.get_layout(spec, (128, 64), device).stats()
            res["full_128x64"], res["partial_128x64"] = st64["full"], st64["partial"]
        if cuda:
            res["flex_same_layout_ms"] = _try(lambda: _time(
                lambda: neighborhood_attention(q, k, v, backend="flex", **kw), reps, warmup, cuda))
            res["flex_natten_style_ms"] = _try(lambda: _flex_untiled(q, k, v, spec, reps, warmup))
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        do = torch.randn_like(q)

        def fb_ours():
            o = neighborhood_attention(qg, kg, vg, backend=backend, **kw)
            torch.autograd.grad(o, (qg, kg, vg), do)

        def fb_dense():
            o = F.scaled_dot_product_attention(qg, kg, vg)
            torch.autograd.grad(o, (qg, kg, vg), do)

        res["fwd_bwd_ours_ms"] = _try(lambda: _time(fb_ours, max(3, reps // 2), 1, cuda))
        res["fwd_bwd_dense_ms"] = _try(lambda: _time(fb_dense, max(3, reps // 2), 1, cuda))
        if isinstance(res["fwd_bwd_ours_ms"], float) and isinstance(res["fwd_bwd_dense_ms"], float):
            res["fwd_bwd_speedup_x"] = res["fwd_bwd_dense_ms"] / res["fwd_bwd_ours_ms"]
    return res


def _flex_untiled(q, k, v, spec, reps, warmup) -> float:
    """Compiled FlexAttention on row-major tokens (no tiling) with the NA mask_mod in its partial blocks and
    our exact FULL/PARTIAL block lists (NATTEN's flex path without token permutation)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    N, dev = spec.seq_len, q.device
    full, partial = nl.classify_blocks(spec, torch.arange(N, device=dev), (128, 128))
    if N % 128:
        partial[:, -1] |= full[:, -1]
        full[:, -1] = False
    nkb = full.shape[1]

    def lists(sel):
        idx, cnt = nl._dense_to_lists(sel)
        out = torch.zeros(1, 1, sel.shape[0], nkb, dtype=torch.int32, device=dev)
        out[..., :idx.shape[-1]] = idx
        return cnt, out

    pc, pi = lists(partial)
    fc, fi = lists(full)
    bm = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=128, mask_mod=make_mask_mod(spec, dev),
                                  seq_lengths=(N, N))
    fn = torch.compile(flex_attention)
    return _time(lambda: fn(q, k, v, block_mask=bm), reps, warmup, True)


def run_e2e(device: str, dtype, reps: int, res_px: int = 2048) -> dict:
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
    out = {"e2e": f"Flux-style, 2 double + 4 single blocks, 4x128 heads, {h}x{w} image tokens + {text} text",
           "kernel": kern}

    def step():
        with torch.no_grad():
            return model(**inp).sample

    def measure(tag: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out[f"{tag}_ms"] = _time(step, reps, 1, cuda)
        if cuda:
            out[f"{tag}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    measure("dense")
    for tag, kw in (("na", dict(kernel_size=kern)), ("gna", dict(kernel_size=kern, stride=stride))):
        with visattn.apply(model, "neighborhood", **kw):
            measure(tag)
        out[f"{tag}_speedup_x"] = out["dense_ms"] / out[f"{tag}_ms"]
    return out


def stats_only(cases) -> list:
    rows = []
    for name, (B, H, shape, D), kernel, stride, target in cases:
        spec = make_spec(shape, kernel, stride=stride)
        for bs in ((128, 128), (128, 64)):
            t0 = time.perf_counter()
            c = nl.block_counts(spec, bs)
            rows.append({"case": name, "shape": f"({B}, {H}, {'x'.join(map(str, shape))}, {D})", "kernel": kernel,
                         "stride": stride, "block_m": bs[0], "block_n": bs[1], "tile": list(c["tile"]),
                         "full": c["full"], "partial": c["partial"], "empty": c["empty"],
                         "block_density": c["density"],
                         "element_density": allowed_pairs(spec) / spec.seq_len ** 2,
                         "classify_cpu_s": time.perf_counter() - t0})
    return rows


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, str) and x.startswith("failed"):
        return "failed"
    return "-" if x is None else str(x)


def print_table(rows, cols) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="forward only, few repetitions, no end-to-end")
    ap.add_argument("--stats-only", action="store_true", help="block counts of the issue's shapes, no timing")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--no-e2e", action="store_true", help="full mode without the end-to-end step")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end step")
    ap.add_argument("--fresh", action="store_true", help="do not merge into an existing JSON")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/bench_neighborhood[_quick|_stats|_cpu].json); rows of the "
                         "cases run replace stored rows of the same case, so a run can be split with --cases")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sel = set(filter(None, args.cases.split(",")))
    pick = lambda cs: [c for c in cs if not sel or c[0] in sel]  # noqa: E731
    meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "quick": args.quick, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.stats_only:
        rows = stats_only(pick(CASES))
        print_table(rows, ["case", "shape", "kernel", "stride", "block_m", "block_n", "tile", "full", "partial",
                           "empty", "block_density", "element_density"])
        out = args.out or os.path.join(HERE, "bench_neighborhood_stats.json")
        with open(out, "w") as f:
            json.dump({"meta": meta, "layouts": rows}, f, indent=1)
        print(f"wrote {out}")
        return
    dtype = torch.bfloat16 if cuda else torch.float32
    reps, warmup = (5, 2) if args.quick else (20, 3)
    if not cuda:
        reps, warmup = 2, 1
    suffix = "_quick" if args.quick else ""
    out = args.out or os.path.join(HERE, f"bench_neighborhood{suffix}.json" if cuda else "bench_neighborhood_cpu.json")
    result = {"meta": meta, "kernels": [], "e2e": None}
    if os.path.exists(out) and not args.fresh:  # merge: rows of cases run now replace the stored ones
        with open(out) as f:
            old = json.load(f)
        result["kernels"], result["e2e"] = old.get("kernels", []), old.get("e2e")
    order = [c[0] for c in CASES + TINY]
    if not args.e2e_only:
        for name, dims, kernel, stride, target in pick(CASES if cuda else TINY):
            t0 = time.perf_counter()
            r = run_case(name, dims, kernel, stride, target, reps=reps, warmup=warmup, device=device, dtype=dtype,
                         full=not args.quick)
            r["bench_wall_s"] = time.perf_counter() - t0
            r["meta"] = meta
            result["kernels"] = [x for x in result["kernels"] if x.get("case") != name] + [r]
            print(json.dumps(r, default=str), flush=True)
        result["kernels"].sort(key=lambda x: order.index(x["case"]) if x.get("case") in order else len(order))
    if args.e2e_only or (not args.quick and not args.no_e2e):
        result["e2e"] = _try(lambda: run_e2e(device, dtype, reps=5 if cuda else 1))
        print(json.dumps(result["e2e"], default=str), flush=True)
    print()
    print_table(result["kernels"], ["case", "shape", "kernel", "stride", "full", "partial", "empty", "dense_ms",
                                    "ours_ms", "ours_kernel_ms", "permute_ms", "speedup_x", "target_x",
                                    "useful_tflops", "ours_128x64_ms", "flex_same_layout_ms", "flex_natten_style_ms",
                                    "fwd_bwd_speedup_x", "layout_build_s", "max_abs_err_vs_fp32"])
    if isinstance(result.get("e2e"), dict):
        print()
        print_table([result["e2e"]], ["e2e", "kernel", "dense_ms", "na_ms", "gna_ms", "na_speedup_x",
                                      "gna_speedup_x", "dense_peak_gib", "na_peak_gib", "gna_peak_gib"])
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
