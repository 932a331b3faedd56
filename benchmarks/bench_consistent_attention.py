"""Batch-mode consistent attention: the concat path vs the block-sparse layout path (and plain attention).

SDXL-like up_blocks geometry per call: ``n`` images per CFG chunk, 2 chunks, grid G x G, sample_rate 0.5.
Times one attention call (median of repeats) and the one-off layout build per step.

    python benchmarks/bench_consistent_attention.py                 # CPU: small sizes
    python benchmarks/bench_consistent_attention.py --device cuda   # GPU: SDXL sizes (768 px: 24x24 and 48x48)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _time(fn, device, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=4, help="images per CFG chunk")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "consistent_attention.json"))
    args = ap.parse_args(argv)
    from visattn.geometry import TokenGeometry
    from visattn.methods import Consistent
    from visattn.methods._consistent_attn import build_layout, pool_indices
    from visattn.methods._consistent_sampling import sample_mask

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    # (grid side, heads, head_dim): SDXL 768 px up_blocks.0 (24x24, 20x64) and up_blocks.1 (48x48, 10x64)
    shapes = [(24, 20, 64), (48, 10, 64)] if cuda else [(12, 4, 64), (24, 2, 64)]
    n, C = args.images, 2
    rows = []
    for side, H, D in shapes:
        N = side * side
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(C * n, H, N, D, generator=g).to(dev, dtype) for _ in range(3))
        geom = TokenGeometry(batch=C * n, heads=H, seq_len=N, kv_len=N, grid=(side, side), cfg_chunks=C, step=3,
                             layer="up_blocks.0.attn1", seed=1)
        row = {"grid": [side, side], "heads": H, "head_dim": D, "images_per_chunk": n, "cfg_chunks": C,
               "plain_ms": _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), dev, args.repeats)}
        concat = Consistent(sample_rate=0.5, gate=(1.0, 1.0), first_step_plain=False)
        row["concat_ms"] = _time(lambda: concat(q, k, v, geom), dev, args.repeats)
        sel = sample_mask(1, 3, (side, side), n, 0.5).to(dev)
        _, flat = pool_indices(sel, geom)
        t = time.perf_counter()
        layout = build_layout(n, N, flat, dev)
        if cuda:
            torch.cuda.synchronize()
        row["layout_build_ms"] = round((time.perf_counter() - t) * 1e3, 3)
        row["layout_density"] = round(layout.density(), 4)
        backends = ["auto"] if cuda else ["sdpa"]
        for be in backends:
            lay = Consistent(sample_rate=0.5, gate=(1.0, 1.0), first_step_plain=False, path="layout", backend=be)
            try:
                row[f"layout_{be}_ms"] = _time(lambda: lay(q, k, v, geom), dev, args.repeats)
                err = (lay(q, k, v, geom).float() - concat(q, k, v, geom).float()).abs().max().item()
                row[f"layout_{be}_max_abs_diff_vs_concat"] = err
            except Exception as e:  # a backend that cannot run this shape: record why
                row[f"layout_{be}_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        print(json.dumps(row))
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
