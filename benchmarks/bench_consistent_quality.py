"""Consistency effect of consistent self-attention: panel-to-panel similarity with vs without it.

Same seeds, same prompts, same pipeline; "without" is ``sample_rate=0`` (exactly plain attention). Scores: the
mean pairwise cosine similarity between the panels of one character of (a) the outputs of the ``up_blocks``
self-attention layers and (b) the output of the last ``up_blocks`` block (cond half, last denoising step), and
(c) the images (centred pixel vectors), averaged
over stories and seeds; also the share of stories where the method raised it. Panels get their own initial noise
(``same_noise=False``; ``--same-noise`` for the app's protocol) so that the similarity comes from the attention.

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

# the embedded default model knows the procedural shapes vocabulary (issue 9). The character descriptions leave
# colour and background open, so only shared attention can make them agree across panels.
DEFAULT_STORIES = [
    ("[Ann] a large star", ["[Ann] at the top left", "[Ann] at the bottom right", "[Ann] in the centre",
                            "[Ann] at the top right"]),
    ("[Bo] a small triangle", ["[Bo] at the left", "[Bo] at the right", "[Bo] at the top", "[Bo] at the bottom"]),
]


def image_similarity(images) -> float:
    """Mean pairwise cosine similarity of centred pixel vectors."""
    vecs = []
    for im in images:
        x = np.asarray(im, dtype=np.float64).reshape(-1) / 255.0
        vecs.append(x - x.mean())
    sims = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)) for a, b in itertools.combinations(vecs, 2)]
    return float(np.mean(sims))


def attribute_agreement(images, classifier) -> dict:
    """Share of panel pairs whose predicted object colour / background colour / shape agree (default model)."""
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((128, 128)), dtype=np.float32) / 255.0)
                     .permute(2, 0, 1) for im in images])
    with torch.no_grad():
        pred = classifier.predict(x)
    pairs = list(itertools.combinations(range(len(images)), 2))
    return {k: float(np.mean([pred[k][a] == pred[k][b] for a, b in pairs])) for k in ("color", "background", "shape")}


def feature_similarity(feats) -> float:
    """Mean pairwise cosine similarity of centred feature tensors."""
    vecs = [f.flatten().double() - f.double().mean() for f in feats]
    return float(np.mean([float(a @ b / (a.norm() * b.norm() + 1e-12)) for a, b in itertools.combinations(vecs, 2)]))


def run_story(pipe, chars, panels, seed, steps, size, same_noise=False, **opts):
    """Generate one story; returns (images, {"attention"|"decoder": features per panel})."""
    from visattn.pipelines import StoryPipeline

    story = StoryPipeline(pipe, same_noise=same_noise, **opts)
    attn = [m for n, m in pipe.unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn1")]
    feats = {"decoder": {}, "attention": {}}
    cap = {"decoder": [], "attention": []}
    hooks = [pipe.unet.up_blocks[-1].register_forward_hook(lambda m, i, o: cap["decoder"].append(o.detach()))]
    hooks += [a.register_forward_hook(lambda m, i, o: cap["attention"].append(o.detach())) for a in attn]
    orig = story._run

    def run(prompts, seed_, kw, ids=()):
        for c in cap.values():
            c.clear()
        res = orig(prompts, seed_, kw, ids)
        for kind, c in cap.items():  # last denoising step: the last call of each hooked module, cond half
            last = c[-1] if kind == "decoder" else torch.cat([t.flatten(1) for t in c[-len(attn):]], 1)
            cond = last[last.shape[0] // 2:] if last.shape[0] == 2 * len(ids) else last
            for j, i in enumerate(ids):
                feats[kind][i] = cond[j]
        return res

    story._run = run
    try:
        out = story(chars, panels, seed=seed, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                    captions=False)
    finally:
        for h in hooks:
            h.remove()
    return out.panels, {k: [v[i] for i in range(len(panels))] for k, v in feats.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default", action="store_true", help="use visattn.pipelines.load_default()")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64, help="height = width in pixels (tiny model)")
    ap.add_argument("--same-noise", action="store_true", help="every panel starts from the seed's noise (the app's)")
    ap.add_argument("--out", default=os.path.join(HERE, "consistent_quality.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    classifier = None
    if args.default:
        from visattn.pipelines import load_default
        from visattn.pipelines.shapes_classifier import load_classifier

        classifier = load_classifier()

        pipe, model = load_default(), "embedded default model (issue 9)"
        pipe.set_progress_bar_config(disable=True)
    else:
        from _story_tiny import tiny_sd_pipeline

        pipe, model = tiny_sd_pipeline(max_length=64), "tiny random-weight SD pipeline (tests/_story_tiny.py)"
    configs = {"plain (sample_rate=0)": dict(sample_rate=0.0), "bank mode, defaults": dict(),
               "batch mode, defaults": dict(mode="batch")}
    kinds = ("attention", "decoder", "images") + (("color", "background", "shape") if classifier else ())
    rows = {kind: {name: [] for name in configs} for kind in kinds}
    t0 = time.time()
    stories = DEFAULT_STORIES if args.default else STORIES
    for (chars, panels), seed in itertools.product(stories, range(args.seeds)):
        for name, opts in configs.items():
            images, feats = run_story(pipe, chars, panels, seed, args.steps, args.size, args.same_noise, **opts)
            for kind in ("attention", "decoder"):
                rows[kind][name].append(feature_similarity(feats[kind]))
            rows["images"][name].append(image_similarity(images))
            if classifier is not None:
                for k, val in attribute_agreement(images, classifier).items():
                    rows[k][name].append(val)
    summary = {}
    for kind, r in rows.items():
        base = np.array(r["plain (sample_rate=0)"])
        summary[kind] = {"mean": {k: round(float(np.mean(v)), 5) for k, v in r.items()},
                         "raised_in": {k: f"{int((np.array(v) > base).sum())}/{len(v)}" for k, v in r.items()
                                       if "plain" not in k}}
    result = {"model": model, "steps": args.steps, "size": args.size, "stories": len(stories), "seeds": args.seeds,
              "same_noise": args.same_noise, "summary": summary, "per_story": rows,
              "seconds": round(time.time() - t0, 1), "device": "cpu"}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("model", "summary", "seconds")}, indent=2))
    return result


if __name__ == "__main__":
    main()
