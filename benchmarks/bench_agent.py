"""AgentSD vs SDPA: one denoising step of an SD1.5-sized random-weight UNet, plus the self-attention layers alone.

    python benchmarks/bench_agent.py                       # H100: 512/1024/2048 px, bf16, batch 2 (CFG)
    python benchmarks/bench_agent.py --quick               # CPU smoke run: tiny UNet, 64/128 px, fp32

Rows (``--modes``):
  sdpa            stock diffusers UNet (AttnProcessor2_0 -> F.scaled_dot_product_attention)
  visattn_dense   visattn processors with the exact "dense" method (processor overhead)
  agentsd         Agent() defaults, agent phase (step 0: ToMe merge 0.4 + 256-agent attention at 512 px)
  agentsd_tome    Agent() in its second phase (steps >= 20: ToMe only), as released
  agent_pool      Agent(merge="pool", merge_ratio=0): pure agent attention, no token merging
Measured: end-to-end UNet forward (ms, CUDA events, median of --iters) and peak memory; and an attention-only
micro-benchmark of every self-attention layer of the UNet (q/k/v of the real shapes, SDPA vs the method), summed
over the layers of each resolution level. Writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def timer(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()``."""
    return median_ms(fn, iters, warmup, device.type == "cuda")


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
    """(level, tokens per side, channels, heads, number of self-attention layers) of the UNet's attn1 layers."""
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


def bench_attention(cfg, latent, batch, dtype, device, warmup, iters, modes):
    """Self-attention layers alone: per level, SDPA vs each method on q/k/v of the UNet's shapes."""
    rows = []
    for lvl, side, c, heads, count in attn_layers(cfg, latent):
        n = side * side
        g = torch.Generator(device="cpu").manual_seed(lvl)
        q, k, v = (torch.randn(batch, heads, n, c // heads, generator=g).to(device, dtype) for _ in range(3))
        geo = TokenGeometry(batch, heads, n, n, grid=(side, side), step=0, num_steps=50,
                            layer=f"level{lvl}.attn1", base_grid=(latent, latent), cfg_chunks=2 if batch % 2 == 0 else 1)
        row = {"level": lvl, "tokens": n, "channels": c, "layers": count}
        for mode in modes:
            if mode == "visattn_dense":
                continue
            m = MODES[mode]() if MODES[mode] else None
            fn = (lambda: F.scaled_dot_product_attention(q, k, v)) if m is None else (lambda: m(q, k, v, geo))
            with torch.inference_mode():
                row[f"{mode}_ms"] = timer(fn, device, warmup, iters)
                row[f"{mode}_gib"] = peak_mem(fn, device)
            if m is not None:
                row[f"{mode}_path"] = m.last_stats.get(geo.layer, {})
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="image sizes in px")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one CFG pair)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-unet", action="store_true", help="attention micro-benchmark only")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny UNet, 64/128 px, fp32, 1 iter")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "bench_agent.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cfg = SD15
    if args.quick:
        cfg, args.sizes, args.dtype, args.warmup, args.iters = TINY, [64, 128], "fp32", 0, 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(device, dtype).eval()
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
           "batch": args.batch, "torch": torch.__version__, "unet": "SD1.5-sized" if cfg is SD15 else "tiny",
           "unet_params_M": sum(p.numel() for p in unet.parameters()) / 1e6, "sizes": {}}
    for px in args.sizes:
        latent = px // 8
        entry = {"latent": latent, "attention": bench_attention(cfg, latent, args.batch, dtype, device, args.warmup,
                                                                args.iters, args.modes)}
        if not args.no_unet:
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
        print(f"{px}px attention (all attn1 layers, ms): {entry.get('attention_total_ms')}; full-res only: "
              f"{entry.get('attention_fullres_ms')}", flush=True)
        res["sizes"][str(px)] = entry
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
