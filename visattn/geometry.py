"""`TokenGeometry`: what an attention call's tokens are, captured by the adapters and handed to methods."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

__all__ = ["TokenGeometry"]


@dataclass(frozen=True)
class TokenGeometry:
    """Layout of one attention call's query sequence (and keys, for self-attention).

    The sequence is ``[prefix tokens][grid tokens, row-major over grid][suffix tokens]``:
    ``spatial_start`` is the index of the first grid token, ``grid`` is ``(H, W)`` or ``(T, H, W)``
    (None when the tokens have no spatial arrangement, e.g. text). Tokens outside the grid span (text in
    joint attention, CLS/register tokens) are *extra* tokens; spatial methods keep them global.

    ``cfg_chunks``: the batch is this many equal chunks (e.g. 2 for batched [uncond, cond] CFG) whose
    images must never exchange information. ``step``/``timestep``/``num_steps``: denoising progress when
    known. ``layer``: the attention module's qualified name. ``is_cross``: keys come from another sequence.
    ``base_grid``: the full-resolution grid of a multi-resolution model (optional; None = unknown).

    ``seed``: a per-run integer the adapters derive from the run's initial noise (so it follows the pipeline's
    ``generator``); None outside a denoising run. It does not take part in ``==``/``hash`` (layout caches
    keyed on the geometry stay valid across runs); use :meth:`rng` for seeded sampling inside a method.
    ``spans``: every grid span of the sequence as ``(start, grid)`` pairs when there are several (e.g. a
    VLM prompt with two images); ``grid``/``spatial_start`` describe the first one.
    """

    batch: int
    heads: int
    seq_len: int
    kv_len: int
    grid: Optional[Tuple[int, ...]] = None
    spatial_start: int = 0
    cfg_chunks: int = 1
    step: Optional[int] = None
    timestep: Optional[float] = None
    num_steps: Optional[int] = None
    layer: str = ""
    is_cross: bool = False
    seed: Optional[int] = field(default=None, compare=False)
    spans: Tuple[Tuple[int, Tuple[int, ...]], ...] = ()
    #: grid of the model's full-resolution token level (UNet: the latent grid), None when unknown or when the
    #: model has a single resolution; lets a method find a layer's downsampling factor (AgentSD's full-res rule)
    base_grid: Optional[Tuple[int, ...]] = None
    #: q's head dim when the adapter knows it (block sizes, and so layouts, can depend on it on CUDA)
    head_dim: Optional[int] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.grid is not None:
            if len(self.grid) not in (1, 2, 3) or min(self.grid) < 1:
                raise ValueError(f"grid must be 1 to 3 positive extents, got {self.grid}")
            if self.spatial_start < 0 or self.spatial_start + self.num_spatial > self.seq_len:
                raise ValueError(f"grid {self.grid} at spatial_start={self.spatial_start} does not fit in "
                                 f"seq_len={self.seq_len}")

    @property
    def num_spatial(self) -> int:
        """Number of grid tokens (0 without a grid)."""
        return math.prod(self.grid) if self.grid is not None else 0

    @property
    def num_prefix(self) -> int:
        return self.spatial_start if self.grid is not None else 0

    @property
    def num_suffix(self) -> int:
        return self.seq_len - self.num_prefix - self.num_spatial if self.grid is not None else 0

    @property
    def num_extra(self) -> int:
        """Tokens outside the grid (prefix + suffix)."""
        return self.seq_len - self.num_spatial if self.grid is not None else self.seq_len

    @property
    def spatial_slice(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.num_spatial)

    def rng(self, device=None, salt: int = 0):
        """A ``torch.Generator`` on ``device`` seeded from (seed, step, layer, salt): the same pipeline
        ``generator`` seed gives the same draws, different steps/layers give different ones."""
        import hashlib

        import torch

        key = f"{self.seed}|{self.step}|{self.layer}|{salt}".encode()
        g = torch.Generator(device=device if device is not None else "cpu")
        g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1))
        return g

    def with_(self, **changes) -> "TokenGeometry":
        """A copy with some fields changed."""
        return replace(self, **changes)

    @staticmethod
    def grid_for_level(base_hw: Tuple[int, int], num_tokens: int) -> Tuple[int, int]:
        """Grid of a UNet level: ``base_hw`` downsampled by powers of two (ceil) until it has ``num_tokens``.

        Raises ``ValueError`` when no level matches, rather than guessing from the token count.
        """
        h, w = base_hw
        for _ in range(12):
            if h * w == num_tokens:
                return (h, w)
            if h == 1 and w == 1:
                break
            h, w = (h + 1) // 2, (w + 1) // 2
        raise ValueError(f"{num_tokens} tokens match no downsampling level of the latent grid {base_hw}")
