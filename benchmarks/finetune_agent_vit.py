"""Convert a trained timm ViT to agent attention and fine-tune it back (CPU, procedural shapes, no downloads).

    python benchmarks/finetune_agent_vit.py                    # 5-25 min on 2 CPU cores (load-dependent)
    python benchmarks/finetune_agent_vit.py --quick            # smoke run (under a minute)

Steps: (1) train a small ViT (timm ``VisionTransformer``, random init) to classify an attribute (``--label``,
default the colour, 12 classes) of the single object in 32 px images from :mod:`visattn.data.shapes`; (2) ``visattn.convert.to_agent`` with each init and
report accuracy and output closeness (logit cosine) before any training; (3) fine-tune the converted model;
(4) as a control, fine-tune the dense model for the same number of steps. Writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import visattn  # noqa: E402
from visattn.convert import to_agent  # noqa: E402


def load_split(split: str, n: int, size: int, seed: int, label: str = "shape"):
    from visattn.data import ShapesDataset
    ds = ShapesDataset(split, length=n, size=size, base_seed=seed, n_objects=1)
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        xs.append(item["image"])
        ys.append(int(item["labels"][label]))
    x = torch.stack(xs)
    x = (x - 0.5) / 0.25
    return x, torch.tensor(ys)


NUM_CLASSES = {"shape": 6, "position": 9, "color": 12}


def make_vit(args) -> torch.nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=args.size, patch_size=args.patch,
                             embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                             num_classes=NUM_CLASSES[args.label])


@torch.no_grad()
def evaluate(model, x, y, bs=256):
    model.eval()
    logits = torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])
    return (logits.argmax(-1) == y).float().mean().item(), logits


def train(model, x, y, epochs: int, lr: float, bs: int, seed: int, log: str = "") -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        tot = 0.0
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            xb = x[idx]
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        print(f"  {log} epoch {ep + 1}/{epochs} loss {tot / len(x):.3f} ({time.time() - t0:.0f}s)", flush=True)
    return time.time() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--epochs", type=int, default=20, help="epochs to train the dense model")
    p.add_argument("--ft-epochs", type=int, default=8, help="fine-tuning epochs after conversion")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--label", default="color", choices=sorted(NUM_CLASSES),
                   help="attribute of the single object to classify (colour: the class token must find the object)")
    p.add_argument("--init", default="local", choices=["local", "zero", "official"])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "finetune_agent_vit.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.val, args.epochs, args.ft_epochs, args.depth = 256, 128, 1, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    xtr, ytr = load_split("train", args.train, args.size, args.seed, args.label)
    xva, yva = load_split("validation", args.val, args.size, args.seed + 1, args.label)
    print(f"data: {len(xtr)} train / {len(xva)} val in {time.time() - t0:.0f}s", flush=True)

    base = make_vit(args)
    t_base = train(base, xtr, ytr, args.epochs, args.lr, args.bs, args.seed, "dense")
    acc_base, logit_base = evaluate(base, xva, yva)
    print(f"dense ViT: val acc {acc_base:.4f}", flush=True)

    conversions = {}
    for init in ("zero", "local", "official"):
        m = to_agent(copy.deepcopy(base), num_agents=args.agents, init=init)
        acc, logits = evaluate(m, xva, yva)
        cos = F.cosine_similarity(logits, logit_base, dim=-1).mean().item()
        conversions[init] = {"val_acc": acc, "logit_cosine": cos}
        print(f"converted (init={init}, no training): val acc {acc:.4f}, logit cosine {cos:.4f}", flush=True)

    agent = to_agent(copy.deepcopy(base), num_agents=args.agents, init=args.init)
    t_ft = train(agent, xtr, ytr, args.ft_epochs, args.ft_lr, args.bs, args.seed + 1, "agent ft")
    acc_ft, _ = evaluate(agent, xva, yva)
    control = copy.deepcopy(base)
    train(control, xtr, ytr, args.ft_epochs, args.ft_lr, args.bs, args.seed + 1, "dense ft (control)")
    acc_ctrl, _ = evaluate(control, xva, yva)
    print(f"agent after {args.ft_epochs} fine-tuning epochs: val acc {acc_ft:.4f} (dense control {acc_ctrl:.4f})")

    res = {
        "config": vars(args), "tokens": (args.size // args.patch) ** 2, "torch": torch.__version__,
        "visattn": visattn.__version__, "threads": torch.get_num_threads(),
        "dense": {"val_acc": acc_base, "train_s": t_base},
        "converted_before_finetune": conversions,
        "agent_finetuned": {"init": args.init, "val_acc": acc_ft, "train_s": t_ft},
        "dense_finetuned_control": {"val_acc": acc_ctrl},
        "total_s": time.time() - t0,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
