"""Consistency effect of consistent self-attention: panel-to-panel similarity with vs without it.

Same seeds, same prompts, same pipeline; "without" is ``sample_rate=0`` (exactly plain attention). The score is
the mean pairwise cosine similarity between the panels of one character (images as centred pixel vectors),
averaged over stories/seeds; also the share of stories where the method raised it.

    python benchmarks/bench_consistent_quality.py                 # tiny random-weight pipeline (CPU, ~minutes)
    python benchmarks/bench_consistent_quality.py --default       # the embedded default model (issue 9)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

STORIES = [
    ("[Bob] a man in a red hat", ["[Bob] at the beach", "[Bob] in a cafe", "[Bob] on a bus", "[Bob] reading a book"]),
    ("[Ann] a red circle", ["[Ann] on a blue background", "[Ann] at the top left", "[Ann] next to a square",
                            "[Ann] on a yellow background"]),
]


def image_similarity(images) -> float:
    """Mean pairwise cosine similarity of centred pixel vectors."""
    vecs = []
    for im in images:
        x = np.asarray(im, dtype=np.float64).reshape(-1) / 255.0
        vecs.append(x - x.mean())
    sims = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)) for a, b in itertools.combinations(vecs, 2)]
    return float(np.mean(sims))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default", action="store_true", help="use visattn.pipelines.load_default()")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64, help="height = width in pixels (tiny model)")
    ap.add_argument("--out", default=os.path.join(HERE, "consistent_quality.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from visattn.pipelines import StoryPipeline

    if args.default:
        from visattn.pipelines import load_default

        pipe, model = load_default(), "embedded default model (issue 9)"
    else:
        from _story_tiny import tiny_sd_pipeline

        pipe, model = tiny_sd_pipeline(), "tiny random-weight SD pipeline (tests/_story_tiny.py)"
    configs = {"plain (sample_rate=0)": dict(sample_rate=0.0), "bank mode, defaults": dict(),
               "batch mode, defaults": dict(mode="batch")}
    rows = {name: [] for name in configs}
    t0 = time.time()
    for (chars, panels), seed in itertools.product(STORIES, range(args.seeds)):
        for name, opts in configs.items():
            story = StoryPipeline(pipe, **opts)
            out = story(chars, panels, seed=seed, num_inference_steps=args.steps, guidance_scale=5.0,
                        height=args.size, width=args.size, captions=False)
            rows[name].append(image_similarity(out.panels))
    base = np.array(rows["plain (sample_rate=0)"])
    result = {"model": model, "steps": args.steps, "size": args.size, "stories": len(STORIES), "seeds": args.seeds,
              "similarity_mean": {k: float(np.mean(v)) for k, v in rows.items()},
              "raised_in": {k: f"{int((np.array(v) > base).sum())}/{len(v)}" for k, v in rows.items() if "plain" not in k},
              "per_story": rows, "seconds": round(time.time() - t0, 1), "device": "cpu"}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("model", "similarity_mean", "raised_in", "seconds")}, indent=2))
    return result


if __name__ == "__main__":
    main()
