"""Shared adapter machinery: per-application run state, layer filters, install records."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..geometry import TokenGeometry
from ..methods.base import AttentionMethod

__all__ = ["RunState", "LayerSpec", "layer_filter", "Installed", "LayerCtx", "seed_from_tensor", "select"]

LayerSpec = Union[str, Callable[[str], bool], "re.Pattern"]


def seed_from_tensor(t: torch.Tensor, n: int = 4096) -> int:
    """A 63-bit integer derived from (up to ``n`` of) the values of ``t``: the run's initial noise."""
    flat = t.detach().reshape(-1)[:n].float().cpu().contiguous()
    return int.from_bytes(hashlib.blake2b(flat.numpy().tobytes(), digest_size=8).digest(), "little") & (2**63 - 1)


@dataclass
class RunState:
    """What the denoiser/model hook knows about the current forward, shared by all processors of one apply().

    Step counting: ``begin_run()`` (called when the pipeline's scheduler runs ``set_timesteps``) resets the
    step; otherwise a denoiser call whose timestep is larger than the previous one starts a new run. A call
    with a new (smaller) timestep advances ``step``; repeated calls with the same timestep (separate CFG
    passes) share a step. ``seed`` is derived from the first denoiser input of a run (the initial noise).
    """

    grid: Optional[Tuple[int, ...]] = None       # token grid of the denoiser input (after patching)
    latent_hw: Optional[Tuple[int, int]] = None  # UNet: sample H, W (levels via TokenGeometry.grid_for_level)
    spatial_start: int = 0                       # timm / VLM: index of the first grid token
    spans: Tuple[Tuple[int, Tuple[int, ...]], ...] = ()
    seq_len: Optional[int] = None                # VLM: length of the captured input_ids
    step: Optional[int] = None
    timestep: Optional[float] = None
    num_steps: Optional[int] = None
    cfg_chunks: int = 1
    cfg_override: Optional[int] = None           # apply(..., cfg_chunks=k)
    cfg_enabled: Optional[bool] = None           # pipeline's do_classifier_free_guidance at run start
    seed: Optional[int] = None
    run_index: int = 0
    calls: int = 0                               # denoiser calls in this run
    on_run_start: Optional[Callable[[], None]] = None  # the method's reset()
    _new_run: bool = True
    # pipeline runs (begin_run from the wrapped scheduler): the schedule, to read timesteps without a host sync,
    # and the CFG split, detected once per run and batch shape instead of on every call
    _scheduled: bool = False
    _schedule_ref: Optional[torch.Tensor] = None
    _schedule_host: Optional[torch.Tensor] = None
    _cfg_key: Optional[tuple] = None

    def begin_run(self, num_steps: Optional[int] = None, cfg_enabled: Optional[bool] = None,
                  timesteps: Optional[torch.Tensor] = None) -> None:
        """Mark the start of a generation (step counter and seed reset at the next denoiser call).
        ``timesteps``: the scheduler's schedule (read once here, so later calls need no device readback)."""
        self._new_run = True
        self.num_steps = num_steps
        self.cfg_enabled = cfg_enabled
        self._scheduled, self._cfg_key = True, None
        ok = isinstance(timesteps, torch.Tensor) and timesteps.dim() == 1 and timesteps.numel() > 0
        self._schedule_ref = timesteps if ok else None
        self._schedule_host = timesteps.detach().to("cpu", torch.float64) if ok else None

    def timestep_value(self, t: Any) -> Optional[float]:
        """The denoiser's ``timestep`` argument as a float. A tensor that views the scheduler's schedule (what
        pipelines pass: ``timesteps[i]``, possibly ``.expand(B)``) is read from the host copy made in
        :meth:`begin_run`, without waiting for the GPU; anything else is read from the tensor."""
        if t is None:
            return None
        if isinstance(t, (int, float)):
            return float(t)
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return None
        ref, host = self._schedule_ref, self._schedule_host
        if (ref is not None and t.device == ref.device and t.dtype == ref.dtype
                and t.untyped_storage().data_ptr() == ref.untyped_storage().data_ptr()):
            i, rem = divmod(t.storage_offset() - ref.storage_offset(), ref.stride(0))
            if rem == 0 and 0 <= i < host.numel():
                return float(host[i])
        return float(t.reshape(-1)[0])

    def on_denoiser_call(self, timestep: Optional[float], sample: Optional[torch.Tensor]) -> None:
        """Update step/timestep/cfg/seed for one denoiser forward."""
        new_run = self._new_run or self.step is None or (
            timestep is not None and self.timestep is not None and timestep > self.timestep)
        if new_run:
            if not self._new_run:  # detected by timestep increase: the previous run's step count is stale
                self.num_steps = None
                self._scheduled, self._schedule_ref, self._schedule_host = False, None, None
            self._new_run = False
            self.run_index += 1
            self.step, self.calls = 0, 0
        elif timestep is not None and timestep != self.timestep:
            self.step += 1
        self.cfg_chunks = self._cfg_for(sample)
        if new_run:
            # seed from the noise of the first CFG chunk, so it does not depend on the guidance setting
            self.seed = seed_from_tensor(sample.chunk(self.cfg_chunks)[0]) if sample is not None else None
            if self.on_run_start is not None:
                self.on_run_start()
        self.calls += 1
        self.timestep = timestep

    def _cfg_for(self, sample: Optional[torch.Tensor]) -> int:
        """CFG chunks of this call: in pipeline runs detected once per (run, batch shape) -- batched CFG repeats
        the latents on every step -- elsewhere on every call."""
        if self.cfg_override is not None or self.cfg_enabled is False or sample is None or not self._scheduled:
            return self._detect_cfg(sample)
        key = (self.run_index, tuple(sample.shape), sample.device)
        if self._cfg_key is None or self._cfg_key[0] != key:
            self._cfg_key = (key, self._detect_cfg(sample))
        return self._cfg_key[1]

    def _detect_cfg(self, sample: Optional[torch.Tensor]) -> int:
        if self.cfg_override is not None:
            return self.cfg_override
        if self.cfg_enabled is False or sample is None:
            return 1
        b = sample.shape[0]
        for k in (3, 2):  # batched CFG repeats the latents: [x, x] (or [x, x, x] for pix2pix-style)
            if b % k == 0 and b >= k:
                chunks = sample.chunk(k)
                if all(torch.equal(chunks[0], c) for c in chunks[1:]):
                    return k
        return 1


@dataclass
class LayerCtx:
    """Per attention module: its name and kind, the method, and the shared run state."""

    name: str
    kind: str  # "self" | "cross"
    method: AttentionMethod
    state: RunState
    last_geometry: Optional[TokenGeometry] = None  # the geometry of this layer's latest call (stats, CLI)

    def geometry(self, q: torch.Tensor, k: torch.Tensor, *, grid: Optional[Tuple[int, ...]] = None,
                 spatial_start: int = 0, spans: Tuple = (), base_grid: Optional[Tuple[int, ...]] = None
                 ) -> TokenGeometry:
        s = self.state
        return TokenGeometry(batch=q.shape[0], heads=q.shape[1], seq_len=q.shape[2], kv_len=k.shape[2], grid=grid,
                             spatial_start=spatial_start if grid is not None else 0, cfg_chunks=s.cfg_chunks,
                             step=s.step, timestep=s.timestep, num_steps=s.num_steps, layer=self.name,
                             is_cross=self.kind == "cross", seed=s.seed, spans=spans, base_grid=base_grid,
                             head_dim=q.shape[-1])

    def attend(self, q, k, v, geometry: TokenGeometry, scale=None, attn_mask=None) -> torch.Tensor:
        self.last_geometry = geometry
        out = self.method(q, k, v, geometry, scale=scale, attn_mask=attn_mask)
        if out.shape != q.shape[:-1] + (v.shape[-1],):
            raise ValueError(f"method {type(self.method).__name__} returned {tuple(out.shape)} for "
                             f"q {tuple(q.shape)} at layer {self.name!r}")
        return out


def layer_filter(layers: LayerSpec) -> Callable[[str, str], bool]:
    """``layers`` -> predicate(name, kind). "self"/"cross"/"all", a callable on names, or a regex (searched)."""
    if isinstance(layers, str) and layers in ("self", "cross", "all"):
        return lambda name, kind: layers == "all" or kind == layers
    if isinstance(layers, str):
        try:
            rx = re.compile(layers)
        except re.error as e:
            raise ValueError(f"layers={layers!r} is neither 'self', 'cross', 'all' nor a valid regex: {e}") from None
        return lambda name, kind: rx.search(name) is not None
    if isinstance(layers, re.Pattern):
        return lambda name, kind: layers.search(name) is not None
    if callable(layers):
        return lambda name, kind: bool(layers(name))
    raise TypeError(f"layers must be 'self', 'cross', 'all', a regex string or a callable(name) -> bool, "
                    f"got {type(layers).__name__}")


def select(candidates: Sequence[Tuple[str, str, Any]], layers: LayerSpec, model: torch.nn.Module,
           unsupported: Sequence[Tuple[str, str, str]] = (), supported_desc: str = "") -> List[Tuple[str, str, Any]]:
    """Filter ``(name, kind, payload)`` candidates by ``layers``; error on selected unsupported modules or on
    an empty selection. ``unsupported``: ``(name, kind, class description)`` of attention modules we cannot
    drive."""
    keep = layer_filter(layers)
    bad = [(n, c) for n, kind, c in unsupported if keep(n, kind)]
    if bad:
        shown = ", ".join(f"{n} ({c})" for n, c in bad[:4]) + (" ..." if len(bad) > 4 else "")
        raise ValueError(f"layers={layers!r} selects attention modules visattn cannot drive in "
                         f"{type(model).__name__}: {shown}. Supported: {supported_desc}. Restrict `layers` "
                         f"to skip them.")
    chosen = [c for c in candidates if keep(c[0], c[1])]
    if not chosen:
        kinds = sorted({k for _, k, _ in candidates})
        raise ValueError(f"layers={layers!r} selects no attention module of {type(model).__name__} "
                         f"({len(candidates)} supported modules, kinds {kinds}"
                         + (f", e.g. {candidates[0][0]!r}" if candidates else "") + ")")
    return chosen


@dataclass
class Installed:
    """What one adapter installed: layer names and undo callbacks (run in reverse order)."""

    layers: List[str] = field(default_factory=list)
    contexts: List[LayerCtx] = field(default_factory=list)
    undo: List[Callable[[], None]] = field(default_factory=list)

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()
