"""Probe: forward-kernel configs for the NA cases on the GPU (issue 4's speed targets).

For the stride cases every query of a 16x16 (2-D) or 16x8x8 (3-D) stride group shares one window, so a
256-row layout block (one whole 2-D stride group) can run as one program with 8 warps, loading each K/V tile
once for 256 queries instead of twice for two 128-row programs. This times layout blocks (256, 64/128) with
``TM=256`` configs against the tuned default and cuDNN dense, in the permutation modes the backend offers, and
checks sampled rows against fp32.

``--configs`` replaces the list with a JSON list of ``[[block_m, block_n], {config} or null]`` pairs; a config
may carry the kernel-variant keys too (``bits``: "select" / "reshape" partial-mask unpacking, ``maxnreg``). ``--nomask`` adds, per config, a timing-only row with every PARTIAL block run
as FULL (wrong values near borders: it bounds what cheaper partial blocks could save).

    python benchmarks/probe_na_tiles.py --out benchmarks/results/na_tiles_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_neighborhood import CASES, Case, _try, perm_mode, sdpa_fns  # noqa: E402

from visattn.kernels import triton_backend as tb  # noqa: E402

# (layout block, fwd config or None for the tuned default)
CONFIGS = [
    ((128, 128), None),
    ((128, 64), None),
    ((256, 128), dict(TM=256, TN=64, num_warps=8, num_stages=2, tma=True)),
    ((256, 128), dict(TM=256, TN=128, num_warps=8, num_stages=2, tma=True)),
    ((256, 64), dict(TM=256, TN=64, num_warps=8, num_stages=3, tma=True)),
    ((256, 128), dict(TM=256, TN=64, num_warps=8, num_stages=3, tma=True)),
]


def compiled_fwd() -> list:
    """(regs, spills, shared bytes) of every compiled forward kernel so far (empty where triton hides them)."""
    out = []
    try:
        for caches in tb._fwd_kernel.device_caches.values():
            for k in caches[0].values():
                out.append((getattr(k, "n_regs", None), getattr(k, "n_spills", None),
                            getattr(getattr(k, "metadata", None), "shared", None)))
    except Exception:
        pass
    return out


def nomask_row(c: Case, bs, cfg, args, dense_ms: float) -> dict:
    """Time the case with its PARTIAL blocks run as FULL (timing only: the values near borders are wrong)."""
    from visattn.kernels.layout import BlockLayout
    lay = c.layout(bs)
    cls = lay.block_classes()
    allfull = BlockLayout.from_block_mask(cls > 0, block_size=bs, seq_lens=(lay.seq_len_q, lay.seq_len_k),
                                          perm_q=lay.perm_q, perm_k=lay.perm_k)
    mode = args.modes.split(",")[-1]
    with perm_mode(mode):
        ms = _try(lambda: c.time(lambda: tb.triton_block_sparse_attention(c.q, c.k, c.v, allfull), args.reps, 2))
    return dict(case=c.name, block=list(bs), cfg=cfg or "default", mode=mode, variant="partial_as_full", ms=ms,
                dense_ms=dense_ms, speedup_x=(dense_ms / ms if isinstance(ms, float) else None),
                full=allfull.stats()["full"], partial=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="2d-gna,3d-gna,2d-na")
    ap.add_argument("--modes", default="fused,fused_q")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--configs", default="", help="JSON list of [[block_m, block_n], config-or-null]")
    ap.add_argument("--nomask", action="store_true")
    args = ap.parse_args()
    configs = [(tuple(b), c) for b, c in json.loads(args.configs)] if args.configs else CONFIGS
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()
    rows = []
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "rows": rows}
    for name, dims, kernel, stride, target in CASES:
        if name not in args.cases.split(","):
            continue
        c = Case(name, dims, kernel, stride, target, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
        dense = {nm: _try(lambda fn=fn: c.time(lambda: fn(c.q, c.k, c.v), args.reps, 2))
                 for nm, fn in sdpa_fns(c.cuda).items()}
        dense_ms = min(t for t in dense.values() if isinstance(t, float))
        print(name, "dense", dense, flush=True)
        for bs, cfg in configs:
            if time.perf_counter() - t_start > args.budget_s:
                break
            tb.CONFIG_OVERRIDES.clear()
            if cfg:
                tb.CONFIG_OVERRIDES[("fwd", None, None, None, None)] = dict(cfg)
            st = c.layout(bs).stats()
            seen = len(compiled_fwd())
            for mode in args.modes.split(","):
                with perm_mode(mode):
                    ms = _try(lambda: c.time(lambda: c.ours(bs=bs), args.reps, 2))
                    err = _try(lambda: c.max_err(c.ours(bs=bs)))
                row = dict(case=name, block=list(bs), cfg=cfg or "default", mode=mode, ms=ms, err=err,
                           dense_ms=dense_ms, speedup_x=(dense_ms / ms if isinstance(ms, float) else None),
                           target_x=target, full=st["full"], partial=st["partial"],
                           useful_tflops=(4 * c.pairs * dims[3] / (ms * 1e-3) / 1e12 if isinstance(ms, float) else None),
                           compiled=compiled_fwd()[seen:])
                rows.append(row)
                print(row, flush=True)
            if args.nomask and st["partial"]:
                rows.append(nomask_row(c, bs, cfg, args, dense_ms))
                print(rows[-1], flush=True)
        tb.CONFIG_OVERRIDES.clear()
        c = None
        if dev == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
