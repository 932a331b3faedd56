"""Identity-bank memory: the released StoryDiffusion approach vs visattn's compact bank, SDXL geometry.

Builds a random-weight SDXL-sized UNet (no download), runs the identity-image write phase (768x768, 35 steps,
1 identity image, batched CFG) and one panel read phase, and records GPU memory:

* ``released``: forward pre-hooks on the ``up_blocks`` self-attention modules store the Bernoulli(0.5)-sampled
  hidden states of both CFG halves on the GPU at every step and layer (what the app's low-VRAM processor keeps);
* ``visattn`` banks: on the GPU in fp16, offloaded to CPU in fp16, offloaded in fp8.

    python benchmarks/bench_consistent_memory.py                  # H100: full SDXL geometry (~2-4 min)
    python benchmarks/bench_consistent_memory.py --tiny           # CPU check of the script with tiny sizes
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=32,
                 use_linear_projection=True, norm_num_groups=16,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=48)


class Runner:
    """Drives the UNet like a CFG pipeline: batch [uncond, cond] x id_images, one call per step."""

    def __init__(self, unet, hw, steps, id_images, text_dim, pooled_dim, device, dtype):
        g = torch.Generator().manual_seed(0)
        h, w = hw[0] // 8, hw[1] // 8
        self.unet, self.steps = unet, steps
        self.x = torch.randn(id_images, 4, h, w, generator=g).to(device, dtype)
        B = 2 * id_images
        self.ehs = torch.randn(B, 77, text_dim, generator=g).to(device, dtype)
        self.added = {"text_embeds": torch.randn(B, pooled_dim, generator=g).to(device, dtype),
                      "time_ids": torch.tensor([[hw[0], hw[1], 0, 0, hw[0], hw[1]]] * B, dtype=dtype, device=device)}
        self.ts = torch.linspace(999, 1, steps).round().long().tolist()

    @torch.no_grad()
    def __call__(self):
        for t in self.ts:
            self.unet(torch.cat([self.x, self.x]), t, encoder_hidden_states=self.ehs, added_cond_kwargs=self.added)


def released_hooks(unet, rate: float, id_images: int, store: list, state: dict):
    """Emulate the app's storage: sampled hidden states (both CFG halves) per step and up_blocks attn1 layer."""
    handles = [unet.register_forward_pre_hook(lambda m, a, k: state.__setitem__("step", state["step"] + 1),
                                              with_kwargs=True)]

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        n = h.shape[1]
        key = (state["step"], n)
        if key not in state["idx"]:
            gen = torch.Generator().manual_seed(hash(key) & 0xFFFF)
            state["idx"][key] = [(torch.rand(n, generator=gen) < rate).nonzero().squeeze(1).to(h.device)
                                 for _ in range(id_images)]
        hv = h.reshape(2, id_images, n, -1)
        store.append([hv[:, i].index_select(1, idx).clone() for i, idx in enumerate(state["idx"][key])])

    for name, mod in unet.named_modules():
        if name.startswith("up_blocks") and name.endswith("attn1"):
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def measure(fn, device):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    res = fn()
    if cuda:
        torch.cuda.synchronize()
    out = {"seconds": round(time.perf_counter() - t, 3)}
    if cuda:
        out["resident_after_gib"] = (torch.cuda.memory_allocated() - base) / 2**30
        out["peak_over_start_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return out, res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny UNet on CPU (checks the script)")
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--id-images", type=int, default=1)
    ap.add_argument("--sample-rate", type=float, default=0.5)
    ap.add_argument("--out", default=os.path.join(HERE, "consistent_memory.json"))
    args = ap.parse_args(argv)
    import visattn
    from diffusers import UNet2DConditionModel
    from visattn.methods import Consistent, IdentityBank
    from visattn.methods._consistent_memory import bank_memory_table

    if args.tiny:
        cfg, device, dtype, size, steps = TINY_UNET, torch.device("cpu"), torch.float32, 64, min(args.steps, 4)
    else:
        cfg, device, dtype, size, steps = SDXL_UNET, torch.device("cuda"), torch.float16, args.size, args.steps
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(dtype).eval()
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    run = Runner(unet, (size, size), steps, args.id_images, cfg["cross_attention_dim"], pooled, device, dtype)
    L = args.id_images
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
              "size": size, "steps": steps, "id_images": L, "sample_rate": args.sample_rate, "dtype": str(dtype),
              "analytic": bank_memory_table(size, size, steps, L, args.sample_rate) if not args.tiny else None}
    result["plain_write"], _ = measure(run, device)

    store, state = [], {"step": 0, "idx": {}}
    hs = released_hooks(unet, args.sample_rate, L, store, state)
    result["released_write"], _ = measure(run, device)
    result["released_write"]["bank_gib"] = sum(t.numel() * t.element_size() for e in store for t in e) / 2**30
    for h in hs:
        h.remove()
    del store
    m = Consistent(sample_rate=args.sample_rate, id_images=L)
    for name, bank_kw in {"visattn_gpu_fp16": dict(device=None), "visattn_cpu_fp16": dict(device="cpu"),
                          "visattn_cpu_fp8": dict(device="cpu", dtype=torch.float8_e4m3fn)}.items():
        bank = IdentityBank(name, **bank_kw)
        with visattn.apply(unet, m, layers=m.layer_filter(), cfg_chunks=2):
            m.set_write(bank)
            result[name + "_write"], _ = measure(run, device)
            result[name + "_write"]["bank_gib"] = bank.nbytes / 2**30
            if name == "visattn_cpu_fp16":
                panel = Runner(unet, (size, size), steps, 1, cfg["cross_attention_dim"], pooled, device, dtype)
                m.set_read(bank)
                result["visattn_cpu_fp16_read"], _ = measure(panel, device)
            m.set_batch()
        del bank
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
