"""Train the embedded default model (VAE, text encoder + UNet, attribute classifier) from scratch.

    python -m visattn.pipelines.train_default --out runs/default            # full config (one H100, < 10 min)
    python -m visattn.pipelines.train_default --out /tmp/t --preset tiny --device cpu   # smoke run

Stages: render data -> VAE -> latents -> UNet + text encoder (v-prediction, mixed 128/256/512 px, EMA)
-> classifier -> export. Each stage checkpoints under ``OUT/state`` and a rerun with the same ``--out``
resumes where it stopped. The exported pipeline folder ``OUT/shapes_sd`` holds ``train_config.json``
(seed, config, steps reached, timings) next to the fp16 weights; ``--pack-dir`` also writes it as tar parts
of at most 15 MiB after every checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import random
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visattn.data.dataset import render_batch
from visattn.data.shapes import Sample, labels, sample_for_split

from .default_model import build_components, make_pipeline


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved next to the weights)."""

    seed: int = 0
    n128: int = 60_000
    n256: int = 16_000
    n512: int = 1_500
    vae_steps: int = 2_500
    vae_batch: int = 64
    vae_lr: float = 5e-4
    vae_kl: float = 1e-6
    vae_time: float = 45.0
    unet_steps: int = 16_000
    unet_batch: int = 128
    unet_lr: float = 4e-4
    text_lr: float = 2e-4
    warmup: int = 200
    unet_time: float = 400.0  # an upper bound: total_time ends the stage first (366 s in the shipped run)
    res_cycle: tuple[int, ...] = (128, 128, 128, 128, 128, 256, 256, 512)
    cfg_drop: float = 0.1
    snr_gamma: float = 0.0  # > 0: v-loss weight min(snr + 1, gamma) / (snr + 1); 0 = plain v-loss (shipped)
    cuda_graphs: bool = True  # replay each resolution's training step as a CUDA graph (CUDA only)
    # timestep sampling: this fraction of each batch draws t uniformly below t_focus_max, the rest from all
    # 1000 steps. With the linear schedule alpha-bar is < 0.01 above t ~ 680 at 32x32 latents, where the model only
    # learns the conditional mean (background, layout); object shapes form at mid noise. 0 = uniform (the shipped
    # checkpoint before 2026-11-23's). 0.7 cost position accuracy (61%; layout is decided at high noise); 0.35 keeps
    # it at 100% (docs/default_model.md, "Training runs compared").
    t_focus_frac: float = 0.35
    t_focus_max: int = 600
    ema_decay: float = 0.999
    clf_n: int = 24_000
    clf_steps: int = 2_000
    clf_batch: int = 256
    clf_lr: float = 2e-3
    clf_time: float = 30.0
    ckpt_every: float = 60.0
    total_time: float = 520.0  # the UNet stage ends early so that the whole run (render to export) fits this
    export_reserve: float = 20.0  # seconds kept for the final export (with clf_time for the classifier)
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError for values the run cannot use."""
        if not 0.0 <= self.t_focus_frac <= 1.0:
            raise ValueError(f"t_focus_frac must be in [0, 1], got {self.t_focus_frac}")
        if not 1 <= self.t_focus_max <= 1000:
            raise ValueError(f"t_focus_max must be in [1, 1000] (the schedule's timesteps), got {self.t_focus_max}")
        bad = [r for r in self.res_cycle if r not in (128, 256, 512)]
        if not self.res_cycle or bad:
            raise ValueError(f"res_cycle must be a non-empty list of 128, 256 and 512, got {list(self.res_cycle)}")
        for name in ("unet_time", "vae_time", "clf_time", "total_time"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """``--set key=json ...`` applied to a config (unknown keys and out-of-range values raise ValueError)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    changes = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set: expected KEY=JSON with KEY one of {names}, got {kv!r}")
        try:
            val = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {key}: the value must be JSON (e.g. 340, 0.35, [128, 256]), got {value!r}") from e
        changes[key] = tuple(val) if isinstance(val, list) else val
    out = dataclasses.replace(cfg, **changes)
    out.validate()
    return out


PRESETS: dict[str, dict] = {
    "full": {},
    "tiny": dict(n128=96, n256=24, n512=8, vae_steps=4, vae_batch=8, unet_steps=10, unet_batch=8, warmup=2,
                 clf_n=64, clf_steps=4, clf_batch=16, ckpt_every=0.0, res_cycle=(128, 256, 128, 512),
                 unet=dict(block_out_channels=(32, 32, 32), attention_head_dim=(1, 1, 1), norm_num_groups=8),
                 vae=dict(block_out_channels=(16, 16, 16), norm_num_groups=8),
                 text=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, projection_dim=64)),
}


def log(msg: str, out: Path | None = None) -> None:
    """Print with a timestamp and append to OUT/train_log.txt."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if out is not None:
        with open(out / "train_log.txt", "a") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------------------------- data
def _render_chunk(args: tuple[int, int, int, int, int | None, str]) -> np.ndarray:
    start, end, size, base_seed, n_objects, split = args
    return render_batch([sample_for_split(i, split, base_seed, n_objects) for i in range(start, end)], size)


def render_set(n: int, size: int, base_seed: int, n_objects: int | None = None, split: str = "train",
               workers: int = 0) -> tuple[np.ndarray, list[Sample]]:
    """Render n deterministic samples in parallel: (uint8 (n, size, size, 3), samples)."""
    samples = [sample_for_split(i, split, base_seed, n_objects) for i in range(n)]
    chunk = max(1, min(512, n // max(1, workers or 1)))
    jobs = [(s, min(n, s + chunk), size, base_seed, n_objects, split) for s in range(0, n, chunk)]
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate(parts), samples


def junk_word(rng: random.Random) -> str:
    """A random non-word, used to teach the text encoder to ignore unknown words."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))


def caption_variants(samples: list[Sample], seed: int) -> list[list[str]]:
    """Per sample: [full caption, the sample's own variant, full caption with a junk word inserted]."""
    rng = random.Random(seed)
    out = []
    for s in samples:
        words = s.caption.split()
        words.insert(rng.randint(0, len(words)), junk_word(rng))
        out.append([s.caption, s.prompt, " ".join(words)])
    return out


_PLAIN_TEXT = re.compile(r"[a-z]+( [a-z]+)*")


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """(len(texts), 77) int64 ids, padded and truncated like StableDiffusionPipeline does.

    Texts of plain lowercase words separated by single spaces (every training caption) are assembled from a
    per-word cache, which gives the tokenizer's own ids (CLIP's BPE never merges across a space) at a fraction of
    the cost; any other text goes through the tokenizer."""
    length, pad = tokenizer.model_max_length, tokenizer.pad_token_id
    rows: list[list[int]] = []
    cache: dict[str, list[int]] = {}
    other = []
    for i, text in enumerate(texts):
        ids = [tokenizer.bos_token_id]
        if _PLAIN_TEXT.fullmatch(text):
            for word in text.split(" "):
                piece = cache.get(word)
                if piece is None:
                    piece = cache[word] = tokenizer(word, add_special_tokens=False).input_ids
                ids += piece
        else:
            other.append(i)
        ids = ids[:length - 1] + [tokenizer.eos_token_id]
        rows.append(ids + [pad] * (length - len(ids)))
    out = torch.tensor(rows, dtype=torch.long)
    if other:
        out[other] = tokenizer([texts[i] for i in other], padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").input_ids
    return out


def caption_ids(tokenizer, samples: list[Sample], seed: int) -> torch.Tensor:
    """(len(samples), 3, 77) token ids of each sample's three caption variants (see ``caption_variants``)."""
    texts = [text for variants in caption_variants(samples, seed) for text in variants]
    return tokenize(tokenizer, texts).view(len(samples), 3, -1)


def to_float(imgs_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return imgs_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------- state
class Stage:
    """Checkpoint helper for one resumable stage (OUT/state/<name>.pt, OUT/state/<name>.done)."""

    def __init__(self, out: Path, name: str) -> None:
        self.path = out / "state" / f"{name}.pt"
        self.done_path = out / "state" / f"{name}.done"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def done(self) -> bool:
        return self.done_path.exists()

    def load(self) -> dict | None:
        return torch.load(self.path, map_location="cpu", weights_only=False) if self.path.exists() else None

    def save(self, state: dict, done: bool = False) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        if done:
            self.done_path.write_text("done\n")


def lr_at(step: int, total: int, warmup: int, time_frac: float = 0.0) -> float:
    """Linear warm-up then cosine decay to 10%; progress is the larger of the step and time fractions,
    so a run stopped by its time limit still ends annealed."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, max((step - warmup) / max(1, total - warmup), time_frac))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def to_device_async(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor -> ``device`` without stalling the host: a blocking ``.to("cuda")`` synchronises the stream
    (waits for all queued GPU work), which serialises Python's kernel launches with the GPU once per step;
    a non-blocking copy from pinned memory does not."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def snr_weight(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weight of the v-prediction loss: min(snr + 1, gamma) / (snr + 1), a Min-SNR variant that
    down-weights the easy low-noise steps and, unlike min(snr, gamma) / (snr + 1), keeps full weight at the
    near-zero terminal SNR where background and layout are decided. gamma <= 0 gives weight 1."""
    if gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr_plus_one = 1.0 / (1.0 - alpha_bar)  # snr + 1 = alpha_bar / (1 - alpha_bar) + 1
    return snr_plus_one.clamp(max=gamma) / snr_plus_one


# ----------------------------------------------------------------------------------------------- stages
def train_vae(vae, data: dict[int, torch.Tensor], cfg: TrainConfig, out: Path, device: torch.device,
              amp: torch.dtype | None) -> dict:
    """Stage 1: autoencoder (L1 + MSE + tiny KL) on 128 px images, every 4th step on 256 px."""
    st = Stage(out, "vae")
    saved = st.load()
    if saved is not None:
        vae.load_state_dict(saved["model"])
    if st.done:
        log("vae: done (resumed)", out)
        return saved["info"]
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if saved is not None:
        opt.load_state_dict(saved["opt"])
        step, elapsed = saved["step"], saved["elapsed"]
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7 + 1 + step)
    t0, last_ckpt, loss_ema = time.time() - elapsed, time.time(), None
    while step < cfg.vae_steps and time.time() - t0 < cfg.vae_time:
        res = 256 if (step % 4 == 3 and 256 in data) else 128
        bs = cfg.vae_batch if res == 128 else max(1, cfg.vae_batch // 4)
        idx = torch.randint(0, data[res].shape[0], (bs,), generator=gen)
        x = to_float(data[res][to_device_async(idx, data[res].device)].to(device))
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_at(step, cfg.vae_steps, 100, (time.time() - t0) / cfg.vae_time)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        loss_ema = loss.detach() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.detach()
        if step % 200 == 0:
            log(f"vae step {step} loss {float(loss_ema):.4f} ({time.time() - t0:.0f}s)", out)
        if cfg.ckpt_every and time.time() - last_ckpt > cfg.ckpt_every:
            st.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": time.time() - t0})
            last_ckpt = time.time()
    info = {"vae_steps_done": step, "vae_seconds": round(time.time() - t0, 1),
            "vae_loss": None if loss_ema is None else float(loss_ema)}
    st.save({"model": vae.state_dict(), "step": step, "info": info}, done=True)
    log(f"vae: {info}", out)
    return info


@torch.no_grad()
def encode_latents(vae, data: dict[int, torch.Tensor], device: torch.device, amp: torch.dtype | None,
                   batch_pixels: int = 64 * 128 * 128, scale: float | None = None) -> tuple[dict[int, torch.Tensor], float]:
    """Encode every image (posterior mean); returns scaled latents per resolution and the scaling factor
    (1 / std of the 128 px latents unless `scale` is given)."""
    vae.eval()
    lat: dict[int, torch.Tensor] = {}
    for res, imgs in data.items():
        bs = max(1, batch_pixels // (res * res))
        parts = []
        for i in range(0, imgs.shape[0], bs):
            x = to_float(imgs[i:i + bs].to(device))
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                parts.append(vae.encode(x).latent_dist.mean.float())
        lat[res] = torch.cat(parts)
    scale = float(1.0 / lat[128].std()) if scale is None else scale
    return {r: (v * scale).to(torch.bfloat16 if device.type == "cuda" else torch.float32) for r, v in lat.items()}, scale


class UNetStep:
    """One UNet + text-encoder training step (v-prediction, CFG dropout, Min-SNR option, gradient clipping,
    AdamW, EMA) with every random draw made on the device, so a step never waits for the GPU.

    On an H100 the step is GPU-bound (eager 79 ms at batch 256, 143 ms at 512; benchmarks/results/
    train_default_h100.json). On CUDA with ``graphs=True`` each resolution's whole step (forward, backward, clipping,
    optimizer and EMA update) is captured once as a CUDA graph after two eager warm-up steps and then replayed
    (3-12% faster). Learning rate and EMA decay live in device tensors that the host updates in place between
    replays."""

    def __init__(self, unet, te, ema_unet, ema_te, alphas_cumprod: torch.Tensor, lat: dict[int, torch.Tensor],
                 ids: dict[int, torch.Tensor], empty_ids: torch.Tensor, cfg: TrainConfig, device: torch.device,
                 amp: torch.dtype | None, graphs: bool = False) -> None:
        self.unet, self.te, self.cfg, self.device, self.amp = unet, te, cfg, device, amp
        self.graphs = graphs and device.type == "cuda"
        self.lat, self.ids, self.empty = lat, ids, empty_ids.to(device)
        self.alpha_bar = alphas_cumprod.to(device, torch.float32)
        self.params = list(unet.parameters()) + list(te.parameters())
        self.ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
        on_cuda = device.type == "cuda"
        lr = (lambda v: torch.tensor(v, device=device)) if on_cuda else float
        self.opt = torch.optim.AdamW(
            [{"params": list(unet.parameters()), "lr": lr(cfg.unet_lr), "base": cfg.unet_lr},
             {"params": list(te.parameters()), "lr": lr(cfg.text_lr), "base": cfg.text_lr}],
            weight_decay=0.01, betas=(0.9, 0.99), fused=on_cuda, capturable=self.graphs)
        self.decay = torch.zeros((), device=device)  # EMA decay (a tensor so a captured step reads the new value)
        self.cache_casts = not self.graphs  # autocast's weight-cast cache must be off inside a CUDA graph
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._warm: dict[int, int] = {}

    def load_optimizer_state(self, state: dict) -> None:
        """``opt.load_state_dict`` for a resumed run: the saved moments, step counts and learning rates, but this
        run's ``fused``/``capturable`` flags (a checkpoint from a run without CUDA graphs would otherwise turn
        capture off), with learning rates as device tensors on CUDA and floats elsewhere, and the step counters
        where those flags need them."""
        self.opt.load_state_dict(state)
        on_cuda = self.device.type == "cuda"
        for g in self.opt.param_groups:
            g["fused"], g["capturable"] = on_cuda, self.graphs
            g["lr"] = torch.tensor(float(g["lr"]), device=self.device) if on_cuda else float(g["lr"])
        for s in self.opt.state.values():
            if "step" in s:
                s["step"] = s["step"].to(self.device if on_cuda else "cpu", torch.float32)

    def batch_size(self, res: int) -> int:
        """Same pixel count per step at every resolution."""
        return max(1, self.cfg.unet_batch * 128 * 128 // (res * res))

    def set_schedule(self, lr_scale: float, step: int) -> None:
        for g in self.opt.param_groups:
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(g["base"] * lr_scale)
            else:
                g["lr"] = g["base"] * lr_scale
        self.decay.fill_(min(self.cfg.ema_decay, (1 + step) / (10 + step)))

    def sample_timesteps(self, n: int) -> torch.Tensor:
        """n training timesteps: uniform over the schedule, except a ``t_focus_frac`` share drawn uniformly below
        ``t_focus_max``."""
        t = torch.randint(0, self.alpha_bar.shape[0], (n,), device=self.device)
        if self.cfg.t_focus_frac > 0:
            focus = torch.rand(n, device=self.device) < self.cfg.t_focus_frac
            t = torch.where(focus, torch.randint(0, self.cfg.t_focus_max, (n,), device=self.device), t)
        return t

    def _compute(self, res: int) -> torch.Tensor:
        lat, ids, dev, bs = self.lat[res], self.ids[res], self.device, self.batch_size(res)
        idx = torch.randint(0, lat.shape[0], (bs,), device=dev)
        r = torch.rand(bs, device=dev)
        variant = (r >= 0.5).long() + (r >= 0.9).long()  # full caption 50%, training variant 40%, junk word 10%
        drop = torch.rand(bs, device=dev) < self.cfg.cfg_drop
        t = self.sample_timesteps(bs)
        x0 = lat[idx].float()
        tok = torch.where(drop[:, None], self.empty, ids[idx, variant])
        noise = torch.randn_like(x0)
        ab = self.alpha_bar[t]
        a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
        xt, target = a * x0 + s * noise, a * noise - s * x0  # DDPM q(x_t | x_0) and the v target
        with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None, cache_enabled=self.cache_casts):
            enc = self.te(tok)[0]
            pred = self.unet(xt, t, enc).sample
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * snr_weight(ab, self.cfg.snr_gamma)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():  # ema = decay * ema + (1 - decay) * param
            torch._foreach_mul_(self.ema_params, self.decay)
            torch._foreach_add_(self.ema_params, torch._foreach_mul(self.params, 1 - self.decay))
        return loss.detach()

    def __call__(self, res: int) -> torch.Tensor:
        """Run one training step at `res` px; returns the loss as a device tensor (read it rarely)."""
        if not self.graphs or self._warm.get(res, 0) < 2:
            self.opt.zero_grad(set_to_none=True)
            if self.graphs:  # warm-up steps on a side stream, as CUDA graph capture requires
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    loss = self._compute(res)
                torch.cuda.current_stream().wait_stream(side)
                self._warm[res] = self._warm.get(res, 0) + 1
                return loss
            return self._compute(res)
        if res not in self._graphs:
            self.opt.zero_grad(set_to_none=True)  # the graph allocates its own gradients
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = self._compute(res)
            self._graphs[res] = (graph, loss)
        graph, loss = self._graphs[res]
        graph.replay()
        return loss


def train_unet(comps: dict, lat: dict[int, torch.Tensor], ids: dict[int, torch.Tensor], empty_ids: torch.Tensor,
               cfg: TrainConfig, out: Path, device: torch.device, amp: torch.dtype | None, export_fn,
               time_left: float = math.inf) -> dict:
    """Stage 2: UNet + text encoder, v-prediction, CFG dropout, mixed resolutions, EMA (exported). Runs for
    ``cfg.unet_time`` seconds or `time_left` more, whichever ends first."""
    from diffusers import DDPMScheduler

    unet, te = comps["unet"].to(device), comps["text_encoder"].to(device)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    st = Stage(out, "unet")
    saved = st.load()
    if saved is not None:
        unet.load_state_dict(saved["unet"])
        te.load_state_dict(saved["text_encoder"])
        ema_unet.load_state_dict(saved["ema_unet"])
        ema_te.load_state_dict(saved["ema_text_encoder"])
    comps["unet"], comps["text_encoder"] = ema_unet, ema_te  # export the EMA weights
    if st.done:
        log("unet: done (resumed)", out)
        return saved["info"]
    alphas_cumprod = DDPMScheduler.from_config(comps["scheduler"].config).alphas_cumprod
    unet.train()
    te.train()
    ids_dev = {r: v.to(device) for r, v in ids.items()}
    trainer = UNetStep(unet, te, ema_unet, ema_te, alphas_cumprod, lat, ids_dev, empty_ids, cfg, device, amp,
                       graphs=cfg.cuda_graphs)
    opt = trainer.opt
    step, elapsed = 0, 0.0
    if saved is not None:
        trainer.load_optimizer_state(saved["opt"])
        step, elapsed = saved["step"], saved["elapsed"]
    torch.manual_seed(cfg.seed * 7 + 2 + step)
    t0, last_ckpt, loss_ema = time.time() - elapsed, time.time(), None
    limit = max(1.0, min(cfg.unet_time, elapsed + time_left))
    res_list = [r for r in cfg.res_cycle if r in lat]

    def checkpoint(done: bool = False, info: dict | None = None) -> None:
        st.save({"unet": unet.state_dict(), "text_encoder": te.state_dict(), "ema_unet": ema_unet.state_dict(),
                 "ema_text_encoder": ema_te.state_dict(), "opt": opt.state_dict(), "step": step,
                 "elapsed": time.time() - t0, "info": info}, done=done)

    while step < cfg.unet_steps and time.time() - t0 < limit:
        trainer.set_schedule(lr_at(step, cfg.unet_steps, cfg.warmup, (time.time() - t0) / limit), step + 1)
        loss = trainer(res_list[step % len(res_list)])
        step += 1
        loss_ema = loss.clone() if loss_ema is None else 0.99 * loss_ema + 0.01 * loss
        if step % 50 == 0 and device.type == "cuda":
            torch.cuda.synchronize()  # keep the host from queueing far past the time budget
        if step % 250 == 0:
            log(f"unet step {step} loss {float(loss_ema):.4f} ({time.time() - t0:.0f}s)", out)
        if cfg.ckpt_every and time.time() - last_ckpt > cfg.ckpt_every:
            checkpoint()
            export_fn({"unet_steps_done": step, "partial": True})
            last_ckpt = time.time()
    info = {"unet_steps_done": step, "unet_seconds": round(time.time() - t0, 1), "unet_time_limit": round(limit, 1),
            "unet_loss": None if loss_ema is None else float(loss_ema)}
    checkpoint(done=True, info=info)
    log(f"unet: {info}", out)
    return info


def train_classifier(clf, vae, cfg: TrainConfig, out: Path, device: torch.device, amp: torch.dtype | None,
                     workers: int) -> dict:
    """Stage 3: attribute classifier on single-object images (augmented, half through the VAE)."""
    st = Stage(out, "classifier")
    saved = st.load()
    if saved is not None:
        clf.load_state_dict(saved["model"])
        if st.done:
            log("classifier: done (resumed)", out)
            return saved["info"]
    imgs, samples = render_set(cfg.clf_n, 128, cfg.seed * 1000 + 4, n_objects=1, workers=workers)
    labs = {k: torch.tensor([labels(s)[k] for s in samples], device=device)
            for k in ("shape", "color", "size", "position", "background")}
    imgs_t = torch.from_numpy(imgs).to(device)
    vimgs, vsamples = render_set(512, 128, cfg.seed * 1000 + 5, n_objects=1, split="validation", workers=workers)
    clf.to(device).train()
    vae.to(device).eval()
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.clf_lr, weight_decay=0.01)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7 + 3)
    t0, step, loss_ema = time.time(), 0, None
    while step < cfg.clf_steps and time.time() - t0 < cfg.clf_time:
        idx = to_device_async(torch.randint(0, imgs_t.shape[0], (cfg.clf_batch,), generator=gen), device)
        x = to_float(imgs_t[idx])
        if step % 2 == 1:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                x = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        x = (x + 1) / 2
        b = x.shape[0]
        gain = 1 + 0.08 * (torch.rand(b, 3, 1, 1, device=device) - 0.5) * 2
        x = x * gain + 0.04 * (torch.rand(b, 3, 1, 1, device=device) - 0.5) * 2
        blur = torch.rand(b, 1, 1, 1, device=device) < 0.3
        x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
        x = (x + torch.randn_like(x) * 0.05 * torch.rand(b, 1, 1, 1, device=device)).clamp(0, 1)
        for g in opt.param_groups:
            g["lr"] = cfg.clf_lr * lr_at(step, cfg.clf_steps, 100, (time.time() - t0) / cfg.clf_time)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = clf(x)
        loss = sum(F.cross_entropy(logits[k].float(), labs[k][idx]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_ema = loss.detach() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.detach()
        if step % 250 == 0:
            log(f"classifier step {step} loss {float(loss_ema):.4f} ({time.time() - t0:.0f}s)", out)
    clf.eval()
    with torch.no_grad():
        vx = torch.from_numpy(vimgs).to(device)
        pred = clf((to_float(vx) + 1) / 2)
        acc = {k: float((pred[k].argmax(-1).cpu() == torch.tensor([labels(s)[k] for s in vsamples])).float().mean())
               for k in pred}
    info = {"classifier_steps_done": step, "classifier_seconds": round(time.time() - t0, 1),
            "classifier_val_accuracy_clean": acc}
    st.save({"model": clf.state_dict(), "info": info}, done=True)
    log(f"classifier: {info}", out)
    return info


# ----------------------------------------------------------------------------------------------- export
def export(comps: dict, clf, cfg: TrainConfig, out: Path, info: dict, pack_dir: Path | None) -> Path:
    """Write OUT/shapes_sd (fp16 pipeline + train_config.json), the classifier, and optional tar parts."""
    from safetensors.torch import save_file

    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    folder = out / "shapes_sd"
    half = {k: (copy.deepcopy(v).to("cpu", torch.float16) if isinstance(v, torch.nn.Module) else v)
            for k, v in comps.items()}
    make_pipeline(half).save_pretrained(str(folder), safe_serialization=True)
    meta = {"seed": cfg.seed, "config": dataclasses.asdict(cfg), **info,
            "command": "python -m visattn.pipelines.train_default", "torch": torch.__version__}
    (folder / "train_config.json").write_text(json.dumps(meta, indent=1, default=str))
    if clf is not None:
        save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in clf.state_dict().items()},
                  str(out / "shapes_classifier.safetensors"))
    if pack_dir is not None:
        pack(out, pack_dir)
    return folder


def pack(out: Path, pack_dir: Path, part_bytes: int = 15 * 2**20) -> list[Path]:
    """Tar OUT/shapes_sd, the classifier and the log into parts of at most `part_bytes`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("shapes_sd", "shapes_classifier.safetensors", "train_log.txt"):
            if (out / name).exists():
                tar.add(str(out / name), arcname=name)
    data = buf.getvalue()
    pack_dir.mkdir(parents=True, exist_ok=True)
    for old in pack_dir.glob("model.tar.part*"):
        old.unlink()
    parts = []
    for i in range(0, len(data), part_bytes):
        p = pack_dir / f"model.tar.part{i // part_bytes}"
        p.write_bytes(data[i:i + part_bytes])
        parts.append(p)
    return parts


# ----------------------------------------------------------------------------------------------- main
def load_components(path: Path) -> dict:
    """fp32 components of an exported pipeline folder (to fine-tune it with ``--init-from``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(torch_dtype=torch.float32, local_files_only=True)
    return dict(unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
                vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
                text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32),
                tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"))


def run(cfg: TrainConfig, out: Path, device: torch.device, pack_dir: Path | None = None, workers: int = 0,
        init_from: Path | None = None) -> Path:
    """The whole pipeline; returns the exported folder. With `init_from` (an exported pipeline folder) the VAE
    is kept as is and the UNet + text encoder continue from its weights (fine-tuning run)."""
    from .shapes_classifier import ShapesClassifier

    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed)
    amp = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if init_from is not None:
        comps = load_components(init_from)
    else:
        comps = build_components(cfg.seed, unet=cfg.unet, vae=cfg.vae, text=cfg.text)
    clf = ShapesClassifier()
    t_start = time.time()
    data, samples = {}, {}
    for res, n, k in ((128, cfg.n128, 1), (256, cfg.n256, 2), (512, cfg.n512, 3)):
        if n:
            imgs, samples[res] = render_set(n, res, cfg.seed * 1000 + k, workers=workers)
            data[res] = torch.from_numpy(imgs).to(device if device.type == "cuda" else "cpu")
    info: dict = {"render_seconds": round(time.time() - t_start, 1)}
    log(f"rendered {[(r, d.shape[0]) for r, d in data.items()]} in {info['render_seconds']}s", out)

    if init_from is None:
        info.update(train_vae(comps["vae"], data, cfg, out, device, amp))
        t_enc = time.time()
        lat, scale = encode_latents(comps["vae"], data, device, amp)
        comps["vae"].register_to_config(scaling_factor=scale)
    else:
        info["init_from"] = str(init_from)
        t_enc = time.time()
        comps["vae"].to(device)
        lat, scale = encode_latents(comps["vae"], data, device, amp, scale=comps["vae"].config.scaling_factor)
    info["scaling_factor"] = scale
    info["encode_seconds"] = round(time.time() - t_enc, 1)
    del data
    tok = comps["tokenizer"]
    t_tok = time.time()
    ids = {r: caption_ids(tok, s, cfg.seed + r) for r, s in samples.items()}
    info["tokenize_seconds"] = round(time.time() - t_tok, 1)
    empty_ids = tokenize(tok, [""])[0]
    log(f"latents {[(r, tuple(v.shape)) for r, v in lat.items()]} in {info['encode_seconds']}s, scaling factor "
        f"{scale:.4f}; captions tokenized in {info['tokenize_seconds']}s", out)

    def export_fn(extra: dict) -> None:
        export(comps, None, cfg, out, {**info, **extra}, pack_dir)

    time_left = cfg.total_time - (time.time() - t_start) - cfg.clf_time - cfg.export_reserve
    info.update(train_unet(comps, lat, ids, empty_ids, cfg, out, device, amp, export_fn, time_left))
    del lat
    export_fn({"partial": True})
    info.update(train_classifier(clf, comps["vae"], cfg, out, device, amp, workers))
    info["total_seconds"] = round(time.time() - t_start, 1)
    folder = export(comps, clf, cfg, out, info, pack_dir)
    log(f"exported {folder} ({info['total_seconds']}s total)", out)
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="run folder (state/, shapes_sd/, classifier)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pack-dir", type=Path, default=None, help="also write tar parts (<= 15 MiB) here")
    ap.add_argument("--workers", type=int, default=0, help="render processes (0: cpu_count - 1)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="exported pipeline folder to fine-tune (keeps its VAE and tokenizer)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override config fields")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{**PRESETS[args.preset], "seed": args.seed})
    cfg = apply_overrides(cfg, args.set)
    run(cfg, args.out, torch.device(args.device), args.pack_dir, args.workers, args.init_from)


if __name__ == "__main__":
    main()
