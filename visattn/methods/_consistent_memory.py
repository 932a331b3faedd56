"""Identity-bank memory from shapes: the released StoryDiffusion app vs visattn's compact bank.

A level is ``(downsampling factor in pixels, channels, number of shared self-attention layers)``. SDXL's
``up_blocks`` (what the app patches): 30 layers at 1280 channels and H/32 x W/32 tokens, 6 layers at 640
channels and H/16 x W/16 tokens.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

__all__ = ["SDXL_UP_LEVELS", "released_bank_bytes", "visattn_bank_bytes", "expected_gated_steps",
           "bank_memory_table"]

SDXL_UP_LEVELS: Tuple[Tuple[int, int, int], ...] = ((32, 1280, 30), (16, 640, 6))


def _tokens(height: int, width: int, factor: int) -> int:
    return (height // factor) * (width // factor)


def released_bank_bytes(height: int, width: int, steps: int, id_images: int, sample_rate: float = 0.5,
                        levels: Sequence[Tuple[int, int, int]] = SDXL_UP_LEVELS, itemsize: int = 2) -> int:
    """The app's low-VRAM bank: sampled *hidden states* (C values per token) of both CFG halves, for every
    step and every patched layer, on the GPU (expected size for Bernoulli sampling)."""
    per_step = sum(2 * id_images * sample_rate * _tokens(height, width, f) * c * n for f, c, n in levels)
    return int(steps * per_step * itemsize)


def expected_gated_steps(steps: int, gate=(0.7, 0.9), gate_switch_step: int = 20,
                         first_step_plain: bool = True) -> float:
    """Expected number of steps at which one layer shares tokens (sum of the gate probabilities)."""
    return sum(0.0 if (first_step_plain and s < 1) else (gate[0] if s < gate_switch_step else gate[1])
               for s in range(steps))


def visattn_bank_bytes(height: int, width: int, steps: int, id_images: int, sample_rate: float = 0.5,
                       levels: Sequence[Tuple[int, int, int]] = SDXL_UP_LEVELS, itemsize: int = 2,
                       gate=(0.7, 0.9), gate_switch_step: int = 20, first_step_plain: bool = True) -> Dict[str, int]:
    """visattn's bank: sampled post-projection *keys and values* (2C values per token), both CFG halves, only
    for the (step, layer) pairs where the gate fires. ``total``: stored bytes (on the CPU with
    ``bank_device='cpu'``); ``gpu_transient``: the largest single entry copied to the GPU while reading."""
    g = expected_gated_steps(steps, gate, gate_switch_step, first_step_plain)
    per_layer = {f: 2 * 2 * id_images * sample_rate * _tokens(height, width, f) * c for f, c, _ in levels}
    total = g * sum(per_layer[f] * n for f, _, n in levels)
    return {"total": int(total * itemsize), "gpu_transient": int(max(per_layer.values()) * itemsize)}


def bank_memory_table(height: int = 768, width: int = 768, steps: int = 35, id_images: int = 1,
                      sample_rate: float = 0.5) -> Dict[str, float]:
    """GiB figures for the docs: released (GPU), visattn fp16 and fp8 (total, CPU when offloaded), GPU transient."""
    gib = 2.0 ** 30
    rel = released_bank_bytes(height, width, steps, id_images, sample_rate)
    ours = visattn_bank_bytes(height, width, steps, id_images, sample_rate)
    ours8 = visattn_bank_bytes(height, width, steps, id_images, sample_rate, itemsize=1)
    return {"released_gpu_gib": rel / gib, "visattn_fp16_gib": ours["total"] / gib,
            "visattn_fp8_gib": ours8["total"] / gib, "visattn_gpu_resident_offloaded_gib": 0.0,
            "visattn_gpu_transient_mib": ours["gpu_transient"] / 2**20}
