"""Deterministic token sampling and layer gating for consistent self-attention.

Everything here is a pure function of integers (seed, step, grid, layer name): no global RNG is read,
so a run is reproducible from its seed alone, every layer of one resolution in one step sees the same
sample, and write/read phases agree on which (step, layer) pairs share tokens.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence, Tuple

import torch

__all__ = ["mix_seed", "sample_mask", "gate_fires", "layer_wanted"]

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 over the sequence); stable across runs/platforms."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def name_hash(name: str) -> int:
    """Stable 32-bit hash of a layer name (crc32; Python's ``hash`` is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def sample_mask(seed: int, step: int, grid: Sequence[int], n_images: int, rate: float) -> torch.Tensor:
    """Bool (n_images, prod(grid)) on CPU: True where image slot j's grid token is shared this step.

    Each token is kept independently with probability ``rate`` (Bernoulli, as in the released app), from a
    generator seeded by (seed, step, grid, n_images): all layers of one resolution share the sample.
    ``rate`` 0 keeps nothing and 1 keeps everything.
    """
    n_tok = math.prod(grid)
    if rate <= 0.0:
        return torch.zeros(n_images, n_tok, dtype=torch.bool)
    if rate >= 1.0:
        return torch.ones(n_images, n_tok, dtype=torch.bool)
    g = torch.Generator().manual_seed(mix_seed(seed, step, len(grid), *grid, n_images))
    return torch.rand(n_images, n_tok, generator=g) < rate


def gate_fires(gate_seed: int, step: int, layer: str, gate: Tuple[float, float], switch_step: int,
               first_step_plain: bool) -> bool:
    """Whether consistent attention runs for this (step, layer) or the layer falls back to plain attention.

    Fires with probability ``gate[0]`` before ``switch_step`` and ``gate[1]`` from it on (the released app
    draws ``random.random()`` per layer call: CSA when > 0.3 before step 20, > 0.1 after, i.e. 0.7 / 0.9).
    Here the draw is a pure function of (gate_seed, step, layer), so identity and panel runs agree.
    """
    if first_step_plain and step < 1:
        return False
    p = gate[0] if step < switch_step else gate[1]
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    u = (mix_seed(gate_seed, step, name_hash(layer)) >> 11) / float(1 << 52)
    return u < p


_UNET_MARKERS = ("down_blocks", "mid_block", "up_blocks")


def layer_wanted(layers, name: str) -> bool:
    """Whether ``layers`` selects module ``name``.

    ``"up"``: UNet decoder self-attention (names containing ``up_blocks``, as the released app); a model
    without UNet block names (image transformers) has all its self-attention layers selected.
    ``"all"``: every layer. A string otherwise is a substring; a tuple/list: any substring; a callable:
    ``layers(name) -> bool``.
    """
    if layers == "all":
        return True
    if layers == "up":
        if "up_blocks" in name:
            return True
        return not any(m in name for m in _UNET_MARKERS)
    if callable(layers):
        return bool(layers(name))
    if isinstance(layers, str):
        return layers in name
    return any(s in name for s in layers)
