"""Probe: the Triton token gather (kernels/gather.py) against ``index_select`` on the GPU, device time and host
time per call, for the NA benchmark shapes and the e2e step's shape (heads-last inputs, as adapters pass them).

    python benchmarks/probe_gather.py --out benchmarks/results/gather_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from visattn.kernels import triton_backend as tb  # noqa: E402
from visattn.kernels.gather import gather_tokens  # noqa: E402
from visattn.methods.neighborhood import neighborhood_attention  # noqa: E402

SHAPES = [("e2e 128x128+512 text, 4 heads", 1, 4, 128 * 128 + 512, 128, True),
          ("2-D 256x256, 24 heads", 1, 24, 65536, 128, False),
          ("2-D 256x256, 24 heads, heads-last", 1, 24, 65536, 128, True)]


def timed(fn, reps: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    dev = (time.perf_counter() - t0) / reps * 1e3
    return {"host_ms": host, "total_ms": dev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for name, B, H, N, D, heads_last in SHAPES:
        x = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) if heads_last else \
            torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        perm = torch.randperm(N, device="cuda")
        perm32 = perm.to(torch.int32)
        row = {"case": name, "bytes_moved": 2 * x.numel() * x.element_size()}
        row["index_select"] = timed(lambda: x.index_select(2, perm), args.reps)
        row["gather"] = timed(lambda: gather_tokens(x, perm), args.reps)
        row["gather_int32_idx"] = timed(lambda: gather_tokens(x, perm32), args.reps)
        row["equal"] = bool(torch.equal(gather_tokens(x, perm), x.index_select(2, perm)))
        for k in ("index_select", "gather", "gather_int32_idx"):
            row[k]["GB_per_s"] = row["bytes_moved"] / (row[k]["total_ms"] * 1e-3) / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the e2e step's attention call: 128x128 image tokens + 512 global text tokens, 4 heads-last heads
    q, k, v = (torch.randn(1, 512 + 128 * 128, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    na = {}
    for mode in ("q", True, False):
        tb.FUSE_PERMUTATION = mode
        for ks, st in (((48, 48), (1, 1)), ((48, 48), (16, 16))):
            na[f"{mode}_k{ks[0]}_s{st[0]}"] = timed(lambda: neighborhood_attention(
                q, k, v, spatial_shape=(128, 128), kernel_size=ks, stride=st, num_global_tokens=512), args.reps)
    tb.FUSE_PERMUTATION = "auto"
    print(json.dumps(na), flush=True)
    rows.append({"case": "e2e-shaped NA call per permutation mode", **na})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
