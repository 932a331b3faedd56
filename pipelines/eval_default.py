"""Evaluate the default model: generate images for held-out single-object prompts and read them back with
the attribute classifier (and background pixel statistics); also draw the sample grid for docs/.

    python -m visattn.pipelines.eval_default --n 200 --json eval.json --grid docs/images/default_samples.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from visattn.data.shapes import nearest_color, sample_for_split

GRID_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow star in the centre on a purple background",
    "a small green triangle at the top left on a white background",
    "a large blue square at the bottom right on an orange background",
    "a pink ring on the left on a black background",
    "a cyan cross at the top on a gray background",
    "a large red star at the top left and a small blue circle on a yellow background",
    "a white circle at the bottom left and a black square at the top right on a green background",
)


def held_out_prompts(n: int = 200, base_seed: int = 12345) -> list:
    """The first n single-object samples of the validation split (attribute combos never trained on)."""
    return [sample_for_split(i, "validation", base_seed, n_objects=1) for i in range(n)]


def border_color(img: np.ndarray, frac: float = 0.06) -> str:
    """Nearest named colour of the median of a thin border (uint8 HxWx3)."""
    h, w = img.shape[:2]
    b = max(1, int(round(frac * min(h, w))))
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3),
                             img[:, -b:].reshape(-1, 3)])
    return nearest_color(np.median(border, axis=0))


@torch.no_grad()
def generate(pipe, prompts: list[str], size: int, steps: int, guidance: float, seed: int, batch: int) -> np.ndarray:
    """uint8 (N, size, size, 3) images, one seed per prompt index (seed + i)."""
    device = pipe.device
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator(device="cpu").manual_seed(seed + i + j) for j in range(len(chunk))]
        res = pipe(chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np")
        out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    del device
    return np.concatenate(out)


def evaluate(pipe, classifier, n: int = 200, size: int = 128, steps: int = 20, guidance: float = 7.5,
             seed: int = 0, batch: int = 50) -> dict:
    """Accuracy of shape / colour / size / position / background on n held-out single-object prompts."""
    samples = held_out_prompts(n)
    prompts = [s.caption for s in samples]
    t0 = time.time()
    imgs = generate(pipe, prompts, size, steps, guidance, seed, batch)
    gen_s = time.time() - t0
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).to(next(classifier.parameters()).device)
    pred = classifier.predict(x)
    truth = {"shape": [s.objects[0].shape for s in samples], "color": [s.objects[0].color for s in samples],
             "size": [s.objects[0].size for s in samples], "position": [s.objects[0].position for s in samples],
             "background": [s.background for s in samples]}
    acc = {k: float(np.mean([p == t for p, t in zip(pred[k], truth[k])])) for k in truth}
    acc["background_pixels"] = float(np.mean([border_color(im) == s.background for im, s in zip(imgs, samples)]))
    acc["all_attributes"] = float(np.mean([all(pred[k][i] == truth[k][i] for k in truth) for i in range(n)]))
    return {"n": n, "size": size, "steps": steps, "guidance": guidance, "seed": seed, "accuracy": acc,
            "generation_seconds": round(gen_s, 2), "device": str(pipe.device)}


def make_grid(pipe, sizes: tuple[int, ...] = (128, 256), prompts: tuple[str, ...] = GRID_PROMPTS, steps: int = 20,
              guidance: float = 7.5, seed: int = 0, cell: int = 160) -> Image.Image:
    """One row per size, one column per prompt (images resized to `cell` px), prompts as numbers."""
    rows = []
    for size in sizes:
        imgs = generate(pipe, list(prompts), size, steps, guidance, seed, batch=len(prompts))
        rows.append([Image.fromarray(im).resize((cell, cell), Image.Resampling.LANCZOS) for im in imgs])
    label_w = 48
    grid = Image.new("RGB", (label_w + cell * len(prompts), 20 + cell * len(sizes)), "white")
    draw = ImageDraw.Draw(grid)
    for j in range(len(prompts)):
        draw.text((label_w + j * cell + cell // 2 - 4, 4), str(j + 1), fill="black")
    for i, (size, row) in enumerate(zip(sizes, rows)):
        draw.text((4, 20 + i * cell + cell // 2 - 6), f"{size}px", fill="black")
        for j, im in enumerate(row):
            grid.paste(im, (label_w + j * cell, 20 + i * cell))
    return grid


def main(argv: list[str] | None = None) -> None:
    from .default_model import load_default
    from .shapes_classifier import load_classifier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the shipped one)")
    ap.add_argument("--classifier", type=Path, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="*", default=[7.5])
    ap.add_argument("--sizes", type=int, nargs="*", default=[128])
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--grid", type=Path, default=None)
    ap.add_argument("--grid-sizes", type=int, nargs="*", default=[128, 256])
    args = ap.parse_args(argv)
    pipe = load_default(args.device, path=args.model)
    clf = load_classifier(args.classifier, args.device)
    results = []
    for size in args.sizes:
        for g in args.guidance:
            r = evaluate(pipe, clf, args.n, size, args.steps, g, batch=args.batch)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        make_grid(pipe, tuple(args.grid_sizes), guidance=args.guidance[0]).save(args.grid)


if __name__ == "__main__":
    main()
