"""``python3 -m visattn.cli --method NAME [--option k=v ...] --out PATH [--size H W] [--steps N] [--seed S]``.

Runs a small offline Stable-Diffusion-style pipeline (random weights, built from configs; swap
:func:`build_pipeline` for a real model) with the chosen method applied, writes a PNG and prints the time
and the method's block-layout statistics.
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["build_pipeline", "parse_options", "run", "main"]


def build_pipeline(seed: int = 0):
    """A tiny StableDiffusionPipeline (UNet 2 levels, VAE x2, no text encoder; prompts are random embeddings)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=None, tokenizer=None, unet=unet.eval(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parse_options(items: Sequence[str]) -> Dict[str, Any]:
    """``["k=v", ...]`` -> dict; values are Python literals when they parse as one, else strings."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--option expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def run(method: str, options: Dict[str, Any], out: str, size=(64, 64), steps: int = 4, seed: int = 0,
        pipe=None) -> Dict[str, Any]:
    """Generate one image with ``method`` applied; returns timing and layout statistics."""
    import visattn

    pipe = pipe if pipe is not None else build_pipeline()
    g = torch.Generator().manual_seed(seed)
    text_dim = pipe.unet.config.cross_attention_dim
    prompt = torch.randn(1, 8, text_dim, generator=g)
    negative = torch.zeros_like(prompt)
    h, w = size
    with torch.no_grad(), visattn.apply(pipe, method, **options) as handle:
        t0 = time.perf_counter()
        image = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=h, width=w,
                     num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                     output_type="pil").images[0]
        seconds = time.perf_counter() - t0
        stats = {}
        for name, geo in handle.geometries().items():
            s = handle.method.layout_stats(geo) if geo is not None else None
            if s is not None:
                stats[name] = s
        layers = list(handle.layers)
    image.save(out)
    return {"seconds": seconds, "layers": layers, "stats": stats, "size": image.size}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m visattn.cli", description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, help="registered method name (visattn.list_methods())")
    p.add_argument("--option", action="append", default=[], metavar="K=V", help="method option (repeatable)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--size", nargs=2, type=int, default=(64, 64), metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import visattn

    if args.method not in visattn.list_methods():
        p.error(f"unknown method {args.method!r}; known methods: {visattn.list_methods()}")
    try:
        res = run(args.method, parse_options(args.option), args.out, tuple(args.size), args.steps, args.seed)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.method}: {args.size[0]}x{args.size[1]} (HxW) image, {args.steps} steps in {res['seconds']:.2f} s, "
          f"{len(res['layers'])} attention layers -> {args.out}")
    for name, s in res["stats"].items():
        print(f"  {name}: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
