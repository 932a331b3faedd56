"""`TokenGeometry`: what an attention call's tokens are, captured by the adapters and handed to methods."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["TokenGeometry"]

#: fields an adapter may fill in lazily (see ``TokenGeometry._deferred``): the denoising progress and seed, which
#: can need a device->host read that a method which never looks at them should not pay for
_RUN_FIELDS = ("step", "timestep", "num_steps", "seed")


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

    An adapter may hand over a geometry whose ``step``/``timestep``/``num_steps``/``seed`` are not read yet
    (:meth:`_deferred`): they are filled in on first access (including ``==``, ``hash``, ``repr``, ``rng``,
    ``with_``, pickling), with the same values an eager geometry would have had.
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

    @classmethod
    def _deferred(cls, run_values: Callable[[], Dict[str, Any]], **fields: Any) -> "TokenGeometry":
        """A geometry whose run fields (``_RUN_FIELDS``) come from ``run_values()`` (a dict with those keys),
        called at most once, when one of them is first read."""
        g = cls(**fields)
        d = g.__dict__
        for name in _RUN_FIELDS:
            del d[name]
        d["_run_values"] = run_values
        return g

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes missing from the instance: the run fields of a _deferred geometry (their
        # class-level defaults are removed below the class, so the lookup falls through to here)
        d = self.__dict__
        src = d.get("_run_values")
        if src is None or name not in _RUN_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        values = src()
        for k in _RUN_FIELDS:
            d[k] = values[k]
        d.pop("_run_values", None)
        return d[name]

    def __getstate__(self) -> dict:
        if "_run_values" in self.__dict__:
            self.step  # noqa: B018 - fills in the run fields (the source is not picklable state)
        return dict(self.__dict__)

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


# dataclass leaves each field's default as a class attribute; without them an instance that lacks a run field
# (a _deferred geometry) reaches __getattr__. __init__ keeps its defaults, fields() keeps the Field objects.
for _name in _RUN_FIELDS:
    delattr(TokenGeometry, _name)
del _name
