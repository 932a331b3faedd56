"""AgentSD vs SDPA: one denoising step of an SD1.5-sized random-weight UNet, plus the self-attention layers alone.

    python benchmarks/bench_agent.py                       # H100: 512/1024/2048 px, bf16, batch 2 (CFG), ~1-2 min
    python benchmarks/bench_agent.py --no-unet             # attention micro-benchmark only (no diffusers needed)
    python benchmarks/bench_agent.py --quick               # CPU smoke run: tiny UNet, 64/128 px, fp32, + op counts
    python benchmarks/bench_agent.py --count-ops-only      # CPU: aten ops per agent layer call (torch.profiler)

Rows (``--modes``):
  sdpa            stock diffusers UNet (AttnProcessor2_0 -> F.scaled_dot_product_attention)
  visattn_dense   visattn processors with the exact "dense" method (processor overhead; UNet step only)
  agentsd         Agent() defaults, agent phase (step 0: ToMe merge 0.4 + 256-agent attention at 512 px)
  agentsd_tome    Agent() in its second phase (steps >= 20: ToMe only), as released
  agent_pool      Agent(merge="pool", merge_ratio=0): pure agent attention, no token merging
Measured:
- attention micro-benchmark: every self-attention level of the UNet, q/k/v with the real shapes AND the real memory
  layout (head-split views of (B, N, heads*dim) projections, exactly what the diffusers processor hands over), SDPA vs
  each method, CUDA-event median; summed per level (``attention_total_ms``) and over the full-resolution layers that
  AgentSD replaces (``attention_fullres_ms``). Each row records the path the method took (``*_path``: agent / tome /
  dense, token / merged / agent counts) so no row can silently fall back. ``*_host_ms``: host time to issue one call
  (no sync); when it approaches ``*_ms`` the layer is launch-bound.
- UNet step: median of one UNet forward and its peak memory.
- ``--kernels`` (CUDA): torch.profiler count of GPU kernels, memcpys and host-sync API calls in one agent call.
- ``--count-ops`` (CPU, tiny bf16 UNet): aten ops dispatched per agent layer call. Writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
import visattn  # noqa: E402
from visattn import TokenGeometry  # noqa: E402
from visattn.methods import Agent  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
TINY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)

MODES = {
    "sdpa": None,
    "visattn_dense": lambda: visattn.methods.Dense(),
    "agentsd": lambda: Agent(),
    "agentsd_tome": lambda: Agent(steps=(0, 0)),
    "agent_pool": lambda: Agent(merge="pool", merge_ratio=0.0),
}

# aten ops that launch no kernel (views, allocations, metadata) -- excluded from the op counts
_NO_KERNEL = {
    "aten::view", "aten::transpose", "aten::slice", "aten::select", "aten::expand", "aten::as_strided",
    "aten::reshape", "aten::unsqueeze", "aten::squeeze", "aten::split", "aten::narrow", "aten::t", "aten::permute",
    "aten::alias", "aten::detach", "aten::empty", "aten::empty_strided", "aten::flatten", "aten::_unsafe_view",
    "aten::empty_like", "aten::lift_fresh", "aten::resize_", "aten::unflatten", "aten::view_as", "aten::_reshape_alias",
    "aten::expand_as", "aten::result_type", "aten::split_with_sizes", "aten::unbind", "aten::chunk", "aten::dim",
    "aten::size", "aten::to", "aten::promote_types", "aten::resolve_conj", "aten::resolve_neg", "aten::is_same_size",
    "aten::contiguous",
}
_HOST_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy ", "cudaEventSynchronize")


def timer(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()``."""
    return median_ms(fn, iters, warmup, device.type == "cuda")


def host_ms(fn, device, calls: int = 5) -> float:
    """Host milliseconds to issue one call (no synchronisation between calls; CUDA only, else nan)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize()
    return dt


def peak_mem(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def attn_layers(cfg: dict, latent: int):
    """(level, tokens per side, channels, heads, number of self-attention layers) of the UNet's attn1 layers.

    SD1.5's ``attention_head_dim=8`` is (as diffusers reads it for this UNet) the number of heads: 8 heads of
    320/8 = 40 dims at full resolution."""
    out = []
    n_levels = len(cfg["block_out_channels"])
    per_level = {}
    for i, t in enumerate(cfg["down_block_types"]):
        if t.startswith("CrossAttn"):
            per_level[i] = per_level.get(i, 0) + cfg["layers_per_block"]
    for j, t in enumerate(cfg["up_block_types"]):
        if t.startswith("CrossAttn"):
            lvl = n_levels - 1 - j
            per_level[lvl] = per_level.get(lvl, 0) + cfg["layers_per_block"] + 1
    per_level[n_levels - 1] = per_level.get(n_levels - 1, 0) + 1                       # mid block
    for lvl, count in sorted(per_level.items()):
        c = cfg["block_out_channels"][lvl]
        out.append((lvl, -(-latent // 2 ** lvl), c, cfg["attention_head_dim"], count))
    return out


def processor_qkv(batch, heads, n, c, dtype, device, seed):
    """q, k, v (B, heads, N, c/heads) laid out as the diffusers processor gives them: head-split views of
    (B, N, c) projection outputs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randn(batch, n, c, generator=g).to(device, dtype).view(batch, n, heads, c // heads)
                 .transpose(1, 2) for _ in range(3))


def bench_attention(cfg, latent, batch, dtype, device, warmup, iters, modes):
    """Self-attention layers alone: per level, SDPA vs each method on q/k/v of the UNet's shapes and layout."""
    rows = []
    for lvl, side, c, heads, count in attn_layers(cfg, latent):
        n = side * side
        q, k, v = processor_qkv(batch, heads, n, c, dtype, device, lvl)
        geo = TokenGeometry(batch, heads, n, n, grid=(side, side), step=0, num_steps=50,
                            layer=f"level{lvl}.attn1", base_grid=(latent, latent),
                            cfg_chunks=2 if batch % 2 == 0 else 1, seed=1234)
        row = {"level": lvl, "tokens": n, "channels": c, "heads": heads, "head_dim": c // heads, "layers": count}
        for mode in modes:
            if mode == "visattn_dense":
                continue
            m, fn = mode_call(mode, q, k, v, geo)
            with torch.inference_mode():
                row[f"{mode}_ms"] = timer(fn, device, warmup, iters)
                row[f"{mode}_host_ms"] = host_ms(fn, device)
                row[f"{mode}_gib"] = peak_mem(fn, device)
            if m is not None:
                row[f"{mode}_path"] = m.last_stats.get(geo.layer, {})
        rows.append(row)
    return rows


def mode_call(mode, q, k, v, geo):
    """(method instance or None, a no-argument call of one attention in this mode) for the micro-benchmarks."""
    m = MODES[mode]() if MODES[mode] else None
    if m is None:
        return None, lambda: F.scaled_dot_product_attention(q, k, v)
    return m, lambda: m(q, k, v, geo)


def count_kernels(cfg, latent, batch, dtype, device, modes):
    """CUDA: kernels, memcpys and host-sync API calls issued by one call at the full-resolution level."""
    from torch.profiler import ProfilerActivity, profile
    lvl, side, c, heads, _ = attn_layers(cfg, latent)[0]
    n = side * side
    q, k, v = processor_qkv(batch, heads, n, c, dtype, device, 0)
    geo = TokenGeometry(batch, heads, n, n, grid=(side, side), step=0, num_steps=50, layer="level0.attn1",
                        base_grid=(latent, latent), cfg_chunks=2, seed=1234)
    out = {}
    for mode in modes:
        if mode == "visattn_dense":
            continue
        m, fn = mode_call(mode, q, k, v, geo)
        with torch.inference_mode():
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        evs = prof.events()
        kern = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
        names = collections.Counter(e.name[:60] for e in kern)
        syncs = [e.name for e in evs if e.name.startswith(_HOST_SYNC)]
        out[mode] = {"kernels": sum(1 for e in kern if not e.name.startswith(("Memcpy", "Memset"))),
                     "memcpy": sum(1 for e in kern if e.name.startswith("Memcpy")),
                     "host_syncs": len(syncs) - 1,     # minus the profiler's own torch.cuda.synchronize
                     "kernel_names": dict(names.most_common())}
        print(f"{latent * 8}px kernels {mode}: {out[mode]['kernels']} kernels, {out[mode]['memcpy']} memcpy, "
              f"{out[mode]['host_syncs']} host syncs", flush=True)
    return out


def _walk(e):
    for c in e.cpu_children:
        yield c
        yield from _walk(c)


def _compute_below(e) -> bool:
    return any(c.name not in _NO_KERNEL or _compute_below(c) for c in e.cpu_children)


def count_ops(modes=("agentsd", "agentsd_tome", "agent_pool"), hw=(32, 32), dtype=torch.bfloat16,
              factories=None, host_hooks=None) -> dict:
    """CPU torch.profiler on the tiny UNet (bf16, batch 2): aten ops per agent-layer call (full-resolution layer).

    ``dispatched``: non-view aten ops the method issues on the tensors' device (about one GPU kernel each);
    ``kernels``: innermost compute ops (views/allocations excluded), the closest CPU proxy for kernel launches;
    ``host_ops``: torch ops of the CPU-side dst draw (``partition_host``: numpy index arithmetic), which launch
    nothing on a GPU (the method then makes one non-blocking copy). ``factories``/``host_hooks`` let another implementation be counted the same way."""
    from torch.profiler import record_function
    from visattn.methods import agent as agent_module

    factories = factories or {m: MODES[m] for m in modes}
    hooks = host_hooks if host_hooks is not None else [(agent_module, "partition_host")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in hooks]

    def wrap(fn):
        def host_part(*a, **kw):
            with record_function("HOST_PARTITION"):
                return fn(*a, **kw)
        return host_part
    res = {}
    try:
        for mod, name, fn in saved:
            setattr(mod, name, wrap(fn))
        for mode, factory in factories.items():
            res[mode] = r = _count_one(factory(), hw, dtype)
            print(f"ops {mode} ({r['path']}): {r['dispatched']} dispatched aten ops on the tensors' device, "
                  f"{r['kernels']} innermost, {r['host_ops']} host-side (dst draw)", flush=True)
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
    return res


def _count_one(method, hw, dtype) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function
    sys.path.insert(0, os.path.join(_ROOT, "tests"))
    from _tiny_models import tiny_unet, unet_inputs

    orig = method.attend

    def wrapped(q, k, v, g, **kw):
        with record_function("AGENT_CALL|" + g.layer):
            return orig(q, k, v, g, **kw)
    method.attend = wrapped
    unet = tiny_unet().to(dtype)
    inp = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in unet_inputs(hw).items()}
    with visattn.apply(unet, method), torch.no_grad():
        unet(**inp)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            unet(**inp)
    for ev in prof.events():
        if not ev.name.startswith("AGENT_CALL|"):
            continue
        layer = ev.name.split("|", 1)[1]
        st = method.last_stats.get(layer, {})
        if st.get("mode", "dense") == "dense":
            continue
        host = [e for e in _walk(ev) if e.name == "HOST_PARTITION"]
        in_host = {id(e) for h in host for e in _walk(h)}
        host_ops = [c.name for h in host for c in h.cpu_children if c.name not in _NO_KERNEL]
        disp = [c.name for c in ev.cpu_children if c.name not in _NO_KERNEL and c.name != "HOST_PARTITION"]
        kern = [e.name for e in _walk(ev) if e.name not in _NO_KERNEL and e.name != "HOST_PARTITION"
                and id(e) not in in_host and not _compute_below(e)]
        return {"layer": layer, "path": st, "dispatched": len(disp), "kernels": len(kern), "host_ops": len(host_ops),
                "dispatched_ops": dict(collections.Counter(disp).most_common())}
    return {}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="image sizes in px")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one CFG pair)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-unet", action="store_true", help="attention micro-benchmark only (diffusers not needed)")
    p.add_argument("--kernels", action="store_true", help="CUDA: count kernels / host syncs per agent call")
    p.add_argument("--count-ops", action="store_true", help="CPU profiler op counts per agent layer call")
    p.add_argument("--count-ops-only", action="store_true", help="only the CPU op counts")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny UNet, 64/128 px, fp32, 1 iter, op counts")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "bench_agent.json"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not (args.quick or args.count_ops_only) else "cpu")
    cfg = SD15
    if args.quick:
        cfg, args.sizes, args.dtype, args.warmup, args.iters = TINY, [64, 128], "fp32", 0, 1
        args.count_ops = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
           "batch": args.batch, "torch": torch.__version__, "unet": "SD1.5-sized" if cfg is SD15 else "tiny",
           "sizes": {}}
    if args.count_ops or args.count_ops_only:
        res["op_counts_cpu_tiny_unet_bf16"] = count_ops()
    if args.count_ops_only:
        args.sizes = []
    unet = None
    if not args.no_unet and args.sizes:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        with torch.device(device):                     # initialise the 860 M weights on the device (fast)
            unet = UNet2DConditionModel(**cfg)
        unet = unet.to(device, dtype).eval()
        res["unet_params_M"] = sum(p.numel() for p in unet.parameters()) / 1e6
    for px in args.sizes:
        latent = px // 8
        entry = {"latent": latent, "attention": bench_attention(cfg, latent, args.batch, dtype, device, args.warmup,
                                                                args.iters, args.modes)}
        for r in entry["attention"]:
            print(f"{px}px attn level {r['level']} ({r['tokens']} tokens x{r['layers']}): " + ", ".join(
                f"{m} {r[m + '_ms']:.3f} ms" for m in args.modes if m + "_ms" in r), flush=True)
        if args.kernels and device.type == "cuda":
            entry["kernels_fullres_call"] = count_kernels(cfg, latent, args.batch, dtype, device, args.modes)
        if unet is not None:
            g = torch.Generator(device="cpu").manual_seed(px)
            sample = torch.randn(args.batch, 4, latent, latent, generator=g).to(device, dtype)
            text = torch.randn(args.batch, 77, cfg["cross_attention_dim"], generator=g).to(device, dtype)
            t = torch.tensor(999.0, device=device)
            unet_rows = {}
            for mode in args.modes:
                handle = visattn.apply(unet, MODES[mode]()) if MODES[mode] else None
                try:
                    def step():
                        with torch.inference_mode():
                            return unet(sample, t, encoder_hidden_states=text).sample
                    row = {"ms": timer(step, device, args.warmup, args.iters), "peak_gib": peak_mem(step, device)}
                    if handle is not None and hasattr(handle.method, "last_stats"):
                        row["paths"] = sorted({f"{s['mode']}:{s['tokens']}" for s in handle.method.last_stats.values()})
                except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
                    row = {"error": f"OOM: {e}"[:200]}
                finally:
                    if handle is not None:
                        handle.remove()
                unet_rows[mode] = row
                print(f"{px}px unet {mode}: {row}", flush=True)
            entry["unet_step"] = unet_rows
        att = entry["attention"]
        for mode in args.modes:
            if f"{mode}_ms" in att[0]:
                entry.setdefault("attention_total_ms", {})[mode] = sum(r[f"{mode}_ms"] * r["layers"] for r in att)
                entry.setdefault("attention_fullres_ms", {})[mode] = att[0][f"{mode}_ms"] * att[0]["layers"]
        tot, full = entry.get("attention_total_ms", {}), entry.get("attention_fullres_ms", {})
        if "sdpa" in tot:
            entry["attention_speedup"] = {m: tot["sdpa"] / v for m, v in tot.items() if v}
            entry["attention_fullres_speedup"] = {m: full["sdpa"] / v for m, v in full.items() if v}
        print(f"{px}px attention (all attn1 layers, ms): {tot}; full-res only: {full}; speedup (all attn1): "
              f"{ {m: round(s, 2) for m, s in entry.get('attention_speedup', {}).items()} }", flush=True)
        res["sizes"][str(px)] = entry
    res["wall_s"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out} ({res['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
