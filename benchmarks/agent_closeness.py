"""AgentSD closeness to dense on the tiny random-weight SD pipeline / UNet (CPU, seconds).

    python benchmarks/agent_closeness.py            # prints the tables of docs/methods/agent.md, writes JSON

(1) cosine similarity per denoising step of the UNet noise prediction and of the latents (10 DDIM steps,
64x64 px, CFG 5) between a dense run and AgentSD runs; (2) cosine similarity of the full-resolution attn1
outputs to SDPA on the tiny UNet's real q/k/v.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import visattn  # noqa: E402
from visattn.methods import Agent, Dense  # noqa: E402
from _tiny_models import pipeline_kwargs, tiny_sd_pipeline, tiny_unet, unet_inputs  # noqa: E402

CONFIGS = {
    "defaults, steps=(0.0, 0.4)": lambda: Agent(steps=(0.0, 0.4)),
    "agents every step, merge_ratio=0": lambda: Agent(steps=(0, 10**6), merge_ratio=0.0),
    "pool agents every step, merge_ratio=0": lambda: Agent(steps=(0, 10**6), merge="pool", merge_ratio=0.0),
    "ToMe only, steps=(0, 0)": lambda: Agent(steps=(0, 0)),
}


def _run(pipe, steps):
    eps, lat = [], []
    h = pipe.unet.register_forward_hook(
        lambda m, a, o: eps.append((o[0] if isinstance(o, tuple) else o.sample).detach().clone()))

    def cb(p, i, t, kw):
        lat.append(kw["latents"].detach().clone())
        return kw
    with torch.no_grad():
        pipe(**pipeline_kwargs(steps=steps, height=64, width=64), callback_on_step_end=cb,
             callback_on_step_end_tensor_inputs=["latents"])
    h.remove()
    return eps, lat


def step_cosines(steps: int = 10) -> dict:
    pipe = tiny_sd_pipeline()
    de, dl = _run(pipe, steps)
    out = {}
    for name, make in CONFIGS.items():
        with visattn.apply(pipe, make()):
            ae, al = _run(pipe, steps)
        cos = lambda xs, ys: [F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in zip(xs, ys)]
        out[name] = {"eps": cos(ae, de), "latents": cos(al, dl)}
        print(name, "eps:", " ".join(f"{c:.4f}" for c in out[name]["eps"]), "| latents min",
              f"{min(out[name]['latents']):.5f}")
    return out


def layer_cosines() -> dict:
    cap = {}

    @dataclass
    class Capture(Dense):
        def attend(self, q, k, v, geometry, **kw):
            if geometry.grid == geometry.base_grid and geometry.layer not in cap:
                cap[geometry.layer] = (q.clone(), k.clone(), v.clone(), geometry)
            return super().attend(q, k, v, geometry, **kw)

    unet = tiny_unet()
    with visattn.apply(unet, Capture()), torch.no_grad():
        unet(**unet_inputs((32, 32)))
    out = {}
    for name, (q, k, v, g) in cap.items():
        ref = F.scaled_dot_product_attention(q, k, v)
        out[name] = {}
        for cname, make in CONFIGS.items():
            m = make()
            if cname.startswith("defaults"):
                m = Agent()
            o = m(q, k, v, g.with_(step=0))
            out[name][cname] = F.cosine_similarity(o.flatten(), ref.flatten(), dim=0).item()
        print(name, {k: round(v, 4) for k, v in out[name].items()})
    return out


if __name__ == "__main__":
    res = {"step_cosines": step_cosines(), "layer_cosines": layer_cosines()}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "agent_closeness.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)
