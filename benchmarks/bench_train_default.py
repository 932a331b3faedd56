"""Where the default model's training time goes (issue 9): UNet + text-encoder step time per resolution and
batch, eager vs CUDA-graph replay (the same ``UNetStep`` the training script runs; also channels_last and
torch.compile variants, see ``--modes``), latent encoding per resolution and caption tokenization. Random
latents and token ids stand in for the data (same shapes).

    python benchmarks/bench_train_default.py --out benchmarks/results/train_default_h100.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def timed(fn, reps: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def profile_step(fn, dev: torch.device, sync, top: int = 25) -> list:
    """Top ops of one step by device time (CPU time on CPU): name, calls, total ms."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    key = "device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top), flush=True)
    rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0.0))[:top]
    return [dict(name=e.key, calls=e.count, ms=round(getattr(e, key, 0.0) / 1000, 3)) for e in rows]


def main() -> None:
    from diffusers import DDPMScheduler

    from visattn.data.shapes import sample_for_split
    from visattn.pipelines import train_default as td
    from visattn.pipelines.default_model import build_components

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="256,512", help="comma-separated 128-px batch sizes")
    ap.add_argument("--modes", default="eager,graph",
                    help="eager, graph (CUDA-graph replay), cl / cl-graph (UNet in channels_last), "
                         "compile (torch.compile'd UNet, eager step; first resolution only, compile time in first3_s)")
    ap.add_argument("--res", default="128,256,512")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true",
                    help="also profile one eager step per resolution (first batch size) and keep the top ops")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if dev.type == "cuda" else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__, "steps": []}

    comps = build_components(0)
    tok = comps["tokenizer"]
    samples = [sample_for_split(i, "train", 1) for i in range(20_000)]
    t0 = time.perf_counter()
    ids = td.caption_ids(tok, samples, 1)
    results["caption_ids_20k_samples_s"] = round(time.perf_counter() - t0, 2)
    print(f"caption ids for {len(samples)} samples (3 variants each): {results['caption_ids_20k_samples_s']} s", flush=True)

    vae = comps["vae"].to(dev)
    enc = {}
    for res, n in ((128, 2048), (256, 512), (512, 128)):
        imgs = {res: torch.randint(0, 255, (n, res, res, 3), dtype=torch.uint8, device=dev)}
        td.encode_latents(vae, {res: imgs[res][:64]}, dev, amp, scale=1.0)  # warm-up (cudnn benchmark)
        sync()
        t0 = time.perf_counter()
        td.encode_latents(vae, imgs, dev, amp, scale=1.0)
        sync()
        enc[res] = round((time.perf_counter() - t0) / n * 1000, 3)
        print(f"encode {res} px: {enc[res]} ms/image", flush=True)
    results["encode_ms_per_image"] = enc
    vae.cpu()

    resolutions = [int(r) for r in args.res.split(",")]
    lat = {r: torch.randn(1024, 4, r // 4, r // 4, device=dev, dtype=torch.bfloat16) for r in resolutions}
    ids_dev = {r: ids[:1024].to(dev) for r in resolutions}
    empty = td.tokenize(tok, [""])[0]
    for mode in args.modes.split(","):
        graphs = mode.endswith("graph")
        for batch in (int(b) for b in args.batches.split(",")):
            comps = build_components(0)
            unet, te = comps["unet"].to(dev).train(), comps["text_encoder"].to(dev).train()
            if mode.startswith("cl"):
                unet = unet.to(memory_format=torch.channels_last)
            ema_u, ema_t = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
            cfg = td.TrainConfig(unet_batch=batch, cuda_graphs=graphs)
            ab = DDPMScheduler.from_config(comps["scheduler"].config).alphas_cumprod
            trainer = td.UNetStep(unet, te, ema_u, ema_t, ab, lat, ids_dev, empty, cfg, dev, amp, graphs=graphs)
            if mode == "compile":
                trainer.unet = torch.compile(unet)
            trainer.set_schedule(1.0, 100)
            for res in (resolutions[:1] if mode == "compile" else resolutions):
                t0 = time.perf_counter()
                for _ in range(3):  # two eager warm-ups + the capture and first replay in graph mode
                    trainer(res)
                sync()
                first = time.perf_counter() - t0
                ms = timed(lambda res=res, trainer=trainer: trainer(res), args.reps, sync) * 1000
                mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
                row = dict(mode=mode, batch128=batch, res=res, batch=trainer.batch_size(res), ms_per_step=round(ms, 2),
                           first3_s=round(first, 2), peak_gib=round(mem, 2))
                results["steps"].append(row)
                print(row, flush=True)
                if args.profile and mode in ("eager", "cl") and batch == int(args.batches.split(",")[0]):
                    key = "profile" if mode == "eager" else f"profile_{mode}"
                    results.setdefault(key, {})[res] = profile_step(lambda res=res, trainer=trainer: trainer(res),
                                                                    dev, sync)
            del trainer, unet, te, ema_u, ema_t
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
