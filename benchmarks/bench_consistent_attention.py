"""Batch-mode consistent attention: the concat path vs the block-sparse layout path (and plain attention).

Per call: ``n`` images per CFG chunk (default 4), 2 CFG chunks, grid G x G, sample_rate 0.5. On CUDA the sizes are
SDXL's at 768 px (``up_blocks.0``: 24x24 tokens, 20 heads x 64 = 1280 ch, 30 layers; ``up_blocks.1``: 48x48,
10 x 64 = 640 ch, 6 layers), bf16, layout path through the Triton backend.

Measured per shape (median of ``--repeats``, CUDA events on the GPU):

* ``plain_ms``: SDPA over each image's own tokens (the untouched model);
* ``concat_ms`` / ``layout_<backend>_ms``: one call when the step's sample, pool and layout are already cached
  (every layer after the first one of a resolution in a step);
* ``*_new_step_ms``: one call after ``reset()``, i.e. the first layer of a resolution in a step: draws the sample,
  finds the pool indices and, for the layout path, builds the ``BlockLayout`` (the sample changes every step);
* ``layout_build_ms``: ``build_layout`` alone; ``layout_<backend>_first_call_ms``: the very first call (Triton
  compilation included, paid once per process);
* ``*_per_step_ms``: what one denoising step costs at this resolution for one CFG batch:
  ``new_step + (layers - 1) * cached``, with ``layers`` the number of SDXL up_blocks self-attention layers there.

    python benchmarks/bench_consistent_attention.py                                   # CPU: small sizes, fp32
    python benchmarks/bench_consistent_attention.py --device cuda --out attn.json     # GPU: SDXL sizes, ~20 s on H100
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import median_ms  # noqa: E402

# (grid side, heads, head_dim, SDXL up_blocks self-attention layers at this resolution)
GPU_SHAPES = [(24, 20, 64, 30), (48, 10, 64, 6)]      # SDXL 768 px: up_blocks.0 (1280 ch), up_blocks.1 (640 ch)
CPU_SHAPES = [(12, 4, 64, 30), (24, 2, 64, 6)]        # small stand-ins (only ratios mean anything)


def log(obj) -> None:
    print(obj if isinstance(obj, str) else json.dumps(obj), flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--images", type=int, default=4, help="images per CFG chunk")
    ap.add_argument("--backends", default=None, help="layout-path backends, comma-separated "
                    "(default: triton on CUDA, sdpa on the CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 20 on CUDA, 5 on the CPU")
    ap.add_argument("--out", default=os.path.join(HERE, "consistent_attention.json"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    from visattn.geometry import TokenGeometry
    from visattn.methods import Consistent
    from visattn.methods._consistent_attn import build_layout, pool_indices
    from visattn.methods._consistent_sampling import sample_mask

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    backends = args.backends.split(",") if args.backends else (["triton"] if cuda else ["sdpa"])
    repeats = args.repeats or (20 if cuda else 5)
    warmup = 3 if cuda else 1
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    n, C = args.images, 2

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def wall_ms(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return round((time.perf_counter() - t) * 1e3, 3)

    def med(fn):
        return round(median_ms(fn, repeats, warmup, cuda), 3)

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "dtype": str(dtype), "images_per_chunk": n, "cfg_chunks": C, "sample_rate": 0.5,
              "repeats": repeats, "rows": []}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass

    def save():
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    for side, H, D, n_layers in shapes:
        N = side * side
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(C * n, H, N, D, generator=g).to(dev, dtype) for _ in range(3))
        geom = TokenGeometry(batch=C * n, heads=H, seq_len=N, kv_len=N, grid=(side, side), cfg_chunks=C, step=3,
                             layer="up_blocks.0.attn1", seed=1)
        row = {"grid": [side, side], "heads": H, "head_dim": D, "channels": H * D, "sdxl_layers": n_layers,
               "plain_ms": med(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))}
        concat = Consistent(sample_rate=0.5, gate=(1.0, 1.0), first_step_plain=False)
        ref = concat(q, k, v, geom)
        row["concat_ms"] = med(lambda: concat(q, k, v, geom))
        row["concat_new_step_ms"] = med(lambda: (concat.reset(), concat(q, k, v, geom)))
        row["concat_per_step_ms"] = round(row["concat_new_step_ms"] + (n_layers - 1) * row["concat_ms"], 3)
        row["plain_per_step_ms"] = round(n_layers * row["plain_ms"], 3)
        sel = sample_mask(1, 3, (side, side), n, 0.5).to(dev)
        _, flat = pool_indices(sel, geom)
        layout = build_layout(n, N, flat, dev)
        row["layout_build_ms"] = med(lambda: build_layout(n, N, flat, dev))
        row["layout_density"] = round(layout.density(), 4)
        for be in backends:
            lay = Consistent(sample_rate=0.5, gate=(1.0, 1.0), first_step_plain=False, path="layout", backend=be)
            try:
                row[f"layout_{be}_first_call_ms"] = wall_ms(lambda: lay(q, k, v, geom))
                row[f"layout_{be}_ms"] = med(lambda: lay(q, k, v, geom))
                row[f"layout_{be}_new_step_ms"] = med(lambda: (lay.reset(), lay(q, k, v, geom)))
                row[f"layout_{be}_per_step_ms"] = round(row[f"layout_{be}_new_step_ms"]
                                                        + (n_layers - 1) * row[f"layout_{be}_ms"], 3)
                diff = (lay(q, k, v, geom).float() - ref.float()).abs().max().item()
                row[f"layout_{be}_max_abs_diff_vs_concat"] = diff
            except Exception as e:  # a backend that cannot run this shape: record why, keep going
                row[f"layout_{be}_error"] = f"{type(e).__name__}: {e}"[:300]
        result["rows"].append(row)
        log(row)
        save()
    save()
    log(f"done in {result['total_s']} s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
