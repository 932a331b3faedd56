"""Identity-bank memory: the released StoryDiffusion approach vs visattn's compact bank, SDXL geometry.

A random-weight SDXL-sized UNet (2.6 B parameters, fp16) is built on the ``meta`` device and materialised
directly on the GPU with a cheap fan-in-scaled normal init, so nothing is initialised on the CPU and nothing is
downloaded. It is driven like a CFG pipeline (batch [uncond, cond], SDXL ``text_time`` conditioning) at
768x768 (96x96 latents) for 35 steps: one identity image writes a bank, then one panel reads it.

Approaches (each a write phase, then a panel read phase, 35 steps each):

* ``plain``: the UNet without any sharing (baseline peak memory).
* ``released``: a faithful re-implementation of the released app's low-VRAM processor
  (``gradio_app_sdxl_specific_id_low_vram.py``) on the ``up_blocks`` self-attention layers: every step and
  every layer stores the sampled *hidden states* of both CFG halves on the GPU (``.clone()``); a panel
  attends to ``cat(bank, own)`` re-projected by ``to_k``/``to_v``; random per-layer gate 0.7 / 0.9, step 0 plain.
* ``visattn_gpu`` (the ``IdentityBank`` default: stored where produced, in the model's dtype), ``visattn_cpu``
  (``bank_device="cpu"``), ``visattn_cpu_fp8`` and ``visattn_gpu_fp8`` (``bank_dtype=torch.float8_e4m3fn``).

Both approaches draw the same token samples (``sample_mask`` with seed 0), so the stored bytes are also
predicted *exactly* from shapes (``exact_*`` in the JSON) next to the expected values of
``visattn/methods/_consistent_memory.py``. Every phase prints one JSON line (flushed) and the JSON file is
rewritten after every phase, so a run cut short still leaves its partial results.

    python benchmarks/bench_consistent_memory.py --out consistent_memory.json   # GPU: full geometry, ~1 min on H100
    python benchmarks/bench_consistent_memory.py --tiny                         # CPU check of the script, ~10 s
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing here needs the network
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

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

SAMPLE_SEED = 0  # both approaches draw their token samples with sample_mask(SAMPLE_SEED, step, grid, n, rate)
GIB = 2.0 ** 30


def log(msg) -> None:
    print(msg if isinstance(msg, str) else json.dumps(msg), flush=True)


# ---------------------------------------------------------------------------------------------- model
def build_unet(cfg: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight UNet2DConditionModel: built on ``meta`` (no CPU init), materialised on ``device`` in
    ``dtype``, weights N(0, 1/fan_in), norm scales 1, biases 0 (keeps fp16 activations finite)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # parameters get shapes only: no 2.6 B-element kaiming init on the CPU
        unet = UNet2DConditionModel(**cfg)
    unet = torch.nn.Module.to(unet, dtype)     # meta: free; nn.Module.to skips diffusers' fp32-module warning
    unet = unet.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith("weight"):      # GroupNorm / LayerNorm scales
                p.fill_(1.0)
            else:
                p.zero_()
        for b in unet.buffers():               # UNet2DConditionModel has none today; never leave garbage
            b.zero_()
    return unet.eval().requires_grad_(False)


def shared_layers(unet, latent_hw, levels: int):
    """The layers the released app patches (``up_blocks.*attn1``): name -> (grid, hidden C, K/V inner dim)."""
    out = {}
    for name, mod in unet.named_modules():
        if name.startswith("up_blocks") and name.endswith("attn1"):
            i = int(name.split(".")[1])
            f = 2 ** (levels - 1 - i)
            out[name] = ((latent_hw[0] // f, latent_hw[1] // f), mod.to_q.in_features, mod.to_k.out_features)
    return out


class Runner:
    """Drives the UNet like a CFG pipeline: batch [uncond x n, cond x n], one call per step, SDXL conditioning."""

    def __init__(self, unet, hw, steps, n_images, text_dim, pooled_dim, device, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        h, w = hw[0] // 8, hw[1] // 8
        self.unet, self.steps = unet, steps
        self.x = torch.randn(n_images, 4, h, w, generator=g).to(device, dtype)
        B = 2 * n_images
        self.ehs = torch.randn(B, 77, text_dim, generator=g).to(device, dtype)
        self.added = {"text_embeds": torch.randn(B, pooled_dim, generator=g).to(device, dtype),
                      "time_ids": torch.tensor([[hw[0], hw[1], 0, 0, hw[0], hw[1]]] * B, dtype=dtype, device=device)}
        self.ts = torch.linspace(999, 1, steps).round().long().tolist()

    def call(self, t):
        return self.unet(torch.cat([self.x, self.x]), t, encoder_hidden_states=self.ehs,
                         added_cond_kwargs=self.added).sample

    @torch.no_grad()
    def __call__(self):
        for t in self.ts:
            out = self.call(t)
        return out


# ---------------------------------------------------------------------------------- released approach
class ReleasedState:
    """What the released app keeps in module globals: write flag, step counter, id_length, per-step indices."""

    def __init__(self, id_length: int, rate: float, gate=(0.7, 0.9), switch: int = 20):
        self.write, self.step, self.id_length, self.rate = True, -1, id_length, rate
        self.gate, self.switch = gate, switch
        self.rng = random.Random(0)           # the app: unseeded Python random, one draw per layer call
        self._idx = {}

    def indices(self, step: int, grid, n: int, device):
        """Token indices per identity image: Bernoulli(rate) (the app's cal_attn_indice_xl_effcient_memory)."""
        from visattn.methods._consistent_sampling import sample_mask

        key = (step, tuple(grid), n, str(device))
        if key not in self._idx:
            sel = sample_mask(SAMPLE_SEED, step, grid, n, self.rate)
            self._idx = {key: [s.nonzero().squeeze(1).to(device) for s in sel]}   # this step only
        return self._idx[key]


def _attend(attn, q_in, kv_in):
    """AttnProcessor2_0 on (B, N, C) inputs: q from ``q_in``, k/v from ``kv_in`` (SDXL attn1: no norms)."""
    b = q_in.shape[0]
    q, k, v = attn.to_q(q_in), attn.to_k(kv_in), attn.to_v(kv_in)
    hd = k.shape[-1] // attn.heads
    q, k, v = (t.view(b, -1, attn.heads, hd).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * hd).to(q_in.dtype)
    return attn.to_out[1](attn.to_out[0](o))


class ReleasedProcessor:
    """The released low-VRAM ``SpatialAttnProcessor2_0`` (variant B), without globals. Memory-relevant parts
    kept as released: the bank holds ``[h[:, i, idx_i] for i in ids]`` (2, k_i, C) per step on the GPU, written
    at every step (gate or not); read: K/V = to_k/to_v(cat(bank, own)); write: image i attends to the sampled
    tokens of the other identity images plus all its own."""

    def __init__(self, state: ReleasedState, grid):
        self.s, self.grid = state, grid
        self.id_bank = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        s, h = self.s, hidden_states
        assert h.ndim == 3 and encoder_hidden_states is None and attention_mask is None
        step = s.step
        if s.write:
            L = s.id_length
            hv = h.view(2, L, h.shape[1], h.shape[2])
            idx = s.indices(step, self.grid, L, h.device)
            self.id_bank[step] = [hv[:, i].index_select(1, idx[i]).clone() for i in range(L)]
        p = s.gate[0] if step < s.switch else s.gate[1]
        if step < 1 or not s.rng.random() < p:
            return _attend(attn, h, h)
        if s.write:
            outs = [_attend(attn, hv[:, i], torch.cat([hv[:, j].index_select(1, idx[j]) for j in range(L) if j != i]
                                                       + [hv[:, i]], 1)) for i in range(L)]
            return torch.stack(outs, 1).reshape(h.shape)
        return _attend(attn, h, torch.cat(self.id_bank[step] + [h], 1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.id_bank.values() for t in e)


def install_released(unet, layers: dict, state: ReleasedState):
    """Swap the released processor onto the shared layers; returns (processors, undo)."""
    mods = dict(unet.named_modules())
    old = {n: mods[n].processor for n in layers}
    procs = {n: ReleasedProcessor(state, layers[n][0]) for n in layers}
    for n, p in procs.items():
        mods[n].set_processor(p)

    def step_hook(module, args, kwargs):
        state.step += 1

    hook = unet.register_forward_pre_hook(step_hook, with_kwargs=True)

    def undo():
        hook.remove()
        for n, p in old.items():
            mods[n].set_processor(p)

    return procs, undo


# ---------------------------------------------------------------------------------- exact prediction
def exact_bank_bytes(layers: dict, steps: int, id_images: int, rate: float, itemsize: int, m) -> dict:
    """Bytes both approaches store for this run, from shapes and the (deterministic) samples and gates."""
    from visattn.methods._consistent_sampling import gate_fires, sample_mask

    rel = ours = 0
    gated = 0
    for step in range(steps):
        counts = {}
        for name, (grid, c_hidden, c_kv) in layers.items():
            if grid not in counts:
                counts[grid] = int(sample_mask(SAMPLE_SEED, step, grid, id_images, rate).sum())
            k = counts[grid]
            rel += 2 * k * c_hidden * itemsize                        # both CFG halves, hidden states, every step
            if gate_fires(m.gate_seed, step, name, m.gate, m.gate_switch_step, m.first_step_plain):
                ours += 2 * 2 * k * c_kv                              # both CFG halves, K and V, gated pairs
                gated += 1
    return {"released_bytes": rel, "visattn_elements": ours, "gated_pairs": gated,
            "pairs": steps * len(layers)}


def summarize(result: dict) -> dict:
    """One row per approach: bank size and place, GPU memory it keeps after writing, peaks (over the model)."""
    ph, rows = result["phases"], {}
    for name in ("plain", "released", "visattn_gpu", "visattn_cpu", "visattn_cpu_fp8", "visattn_gpu_fp8"):
        w, r = ph.get(name + "_write"), ph.get(name + "_read")
        if w is None:
            continue
        row = {"bank_on": "cpu" if "_cpu" in name else ("-" if name == "plain" else result["device"]),
               "bank_gib": w.get("bank_gib", 0.0), "bank_matches_exact": w.get("bank_matches_exact"),
               "write_ms_per_step": w["ms_per_step"], "read_ms_per_step": r and r["ms_per_step"]}
        for k in ("resident_after_gib", "peak_over_model_gib"):
            if k in w:
                row["write_" + k] = w[k]
            if r and k in r:
                row["read_" + k] = r[k]
        rows[name] = row
    return rows


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny UNet on the CPU (checks the script)")
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--steps", type=int, default=None, help="default 35 (--tiny: 6)")
    ap.add_argument("--id-images", type=int, default=1)
    ap.add_argument("--sample-rate", type=float, default=0.5)
    ap.add_argument("--skip", default="", help="comma-separated approaches to skip (e.g. visattn_gpu_fp8)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/consistent_memory.json; with "
                    "--tiny, consistent_memory_tiny.json in the temp folder)")
    args = ap.parse_args(argv)
    if args.out is None:
        import tempfile
        args.out = (os.path.join(tempfile.gettempdir(), "consistent_memory_tiny.json") if args.tiny
                    else os.path.join(HERE, "consistent_memory.json"))
    t_start = time.perf_counter()

    import visattn
    from visattn.methods import Consistent, IdentityBank
    from visattn.methods._consistent_memory import bank_memory_table

    if args.tiny:
        cfg, device, dtype, size = TINY_UNET, torch.device("cpu"), torch.float32, 128
        steps = args.steps or 6
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (use --tiny on the CPU)")
        cfg, device, dtype, size = SDXL_UNET, torch.device("cuda"), torch.float16, args.size
        steps = args.steps or 35
    cuda = device.type == "cuda"
    L, rate = args.id_images, args.sample_rate
    skip = set(filter(None, args.skip.split(",")))
    levels = len(cfg["block_out_channels"])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def alloc():
        return torch.cuda.memory_allocated() if cuda else 0

    t = time.perf_counter()
    import diffusers  # noqa: F401  (timed apart from the build)
    import_s = time.perf_counter() - t
    t = time.perf_counter()
    unet = build_unet(cfg, device, dtype)
    sync()
    build_s = time.perf_counter() - t
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    ident = Runner(unet, (size, size), steps, L, cfg["cross_attention_dim"], pooled, device, dtype, seed=0)
    panel = Runner(unet, (size, size), steps, 1, cfg["cross_attention_dim"], pooled, device, dtype, seed=1)
    layers = shared_layers(unet, (size // 8, size // 8), levels)
    m = Consistent(sample_rate=rate, id_images=L, seed=SAMPLE_SEED)
    isz, dname = torch.empty((), dtype=dtype).element_size(), str(dtype).replace("torch.", "")
    exact = exact_bank_bytes(layers, steps, L, rate, isz, m)
    with torch.no_grad():                       # warm-up call (cuBLAS/cuDNN handles), not measured
        ident.call(ident.ts[0])
    sync()
    base = alloc()
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "diffusers_import_s": round(import_s, 2), "unet_build_s": round(build_s, 2),
        "size": size, "latent": size // 8, "steps": steps, "id_images": L,
        "panels": 1, "cfg": "batched (batch 2 per image)", "sample_rate": rate, "dtype": str(dtype),
        "shared_layers": len(layers),
        "shared_layer_levels": sorted({f"{g[0]}x{g[1]} x {c}ch: {sum(1 for v in layers.values() if v[:2] == (g, c))}"
                                       for g, c, _ in layers.values()}),
        "model_and_inputs_gib": base / GIB,
        "expected_from_shapes_gib": (bank_memory_table(size, size, steps, L, rate)
                                     if cfg is SDXL_UNET else None),
        "exact_from_shapes": {f"released_{dname}_gib": exact["released_bytes"] / GIB,
                              f"visattn_{dname}_gib": exact["visattn_elements"] * isz / GIB,
                              "visattn_float8_gib": exact["visattn_elements"] / GIB,
                              "gated_pairs": exact["gated_pairs"], "pairs": exact["pairs"]},
        "phases": {},
        "notes": "peak_over_model_gib = max_memory_allocated during the phase minus the memory held by the "
                 "UNet weights and its inputs before any phase; resident_after_gib = what stays allocated after it "
                 "(the bank); UNet only (no text encoders / VAE).",
    }
    log({"setup": {k: result[k] for k in ("device", "unet_params_m", "unet_build_s", "size", "steps",
                                          "shared_layers", "model_and_inputs_gib")}})

    def save():
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    def phase(name, fn, bank_bytes=None):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        sync()
        sec = time.perf_counter() - t0
        rec = {"seconds": round(sec, 2), "ms_per_step": round(sec / steps * 1e3, 1),
               "output_finite": bool(torch.isfinite(out).all())}
        if cuda:
            rec["peak_over_model_gib"] = round((torch.cuda.max_memory_allocated() - base) / GIB, 4)
            rec["resident_after_gib"] = round((alloc() - base) / GIB, 4)
            rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        if bank_bytes is not None:
            rec["bank_bytes"] = int(bank_bytes())
            rec["bank_gib"] = round(rec["bank_bytes"] / GIB, 4)
        if cuda:
            try:  # pinned host memory (the offloaded banks live there)
                hs = torch.cuda.host_memory_stats()
                rec["host_pinned_gib"] = {k: round(v / GIB, 3) for k, v in hs.items()
                                          if isinstance(v, int) and "bytes" in k and "current" in k}
            except Exception:
                pass
        result["phases"][name] = rec
        log({"phase": name, **rec})
        save()

    def cleanup():
        import gc
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # ---- plain
    if "plain" not in skip:
        phase("plain_write", ident)
        phase("plain_read", panel)

    # ---- released (faithful re-implementation; bank on the GPU)
    if "released" not in skip:
        rs = ReleasedState(L, rate)
        procs, undo = install_released(unet, layers, rs)
        try:
            def nb():
                return sum(p.nbytes() for p in procs.values())
            rs.write, rs.step = True, -1
            phase("released_write", ident, nb)
            rs.write, rs.step = False, -1
            phase("released_read", panel, nb)
            result["phases"]["released_write"]["bank_matches_exact"] = nb() == exact["released_bytes"]
        finally:
            undo()
            del procs
            cleanup()

    # ---- visattn
    variants = {"visattn_gpu": dict(device=None), "visattn_cpu": dict(device="cpu")}
    if hasattr(torch, "float8_e4m3fn"):
        variants["visattn_cpu_fp8"] = dict(device="cpu", dtype=torch.float8_e4m3fn)
        variants["visattn_gpu_fp8"] = dict(device=None, dtype=torch.float8_e4m3fn)
    for name, kw in variants.items():
        if name in skip:
            continue
        try:
            bank = IdentityBank(name, **kw)
            with visattn.apply(unet, m, layers=m.layer_filter(), cfg_chunks=2):
                with m.writing(bank):
                    phase(name + "_write", ident, lambda: bank.nbytes)
                    itemsize = torch.empty((), dtype=kw.get("dtype", dtype)).element_size()
                    result["phases"][name + "_write"]["bank_matches_exact"] = \
                        bank.nbytes == exact["visattn_elements"] * itemsize
                    result["phases"][name + "_write"]["entries"] = len(bank)
                with m.reading(bank):
                    phase(name + "_read", panel, lambda: bank.nbytes)
        except Exception as e:  # e.g. a dtype the device cannot store: record it, keep going
            result["phases"][name + "_error"] = f"{type(e).__name__}: {e}"[:300]
            log({"phase": name, "error": result["phases"][name + "_error"]})
            save()
        finally:
            bank = None
            cleanup()
    result["summary"] = summarize(result)
    save()
    log({"summary": result["summary"]})
    log(f"done in {result['total_s']} s -> {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
