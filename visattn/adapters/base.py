"""Shared adapter machinery: per-application run state, layer filters, install records."""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..geometry import TokenGeometry
from ..methods.base import AttentionMethod

__all__ = ["RunState", "LayerSpec", "layer_filter", "Installed", "LayerCtx", "seed_from_tensor", "select"]

LayerSpec = Union[str, Callable[[str], bool], "re.Pattern"]


#: values of the initial noise that the run's seed is derived from
_SEED_VALUES = 4096
#: denoiser calls kept deferred (see RunState.denoiser_call) before they are read in one go
_MAX_DEFERRED = 256


def seed_from_tensor(t: torch.Tensor, n: int = _SEED_VALUES) -> int:
    """A 63-bit integer derived from (up to ``n`` of) the values of ``t``: the run's initial noise."""
    flat = t.detach().reshape(-1)[:n].float().cpu().contiguous()
    return int.from_bytes(hashlib.blake2b(flat.numpy().tobytes(), digest_size=8).digest(), "little") & (2**63 - 1)


class _DeferredCall:
    """A denoiser call whose timestep has not been read yet: device copies of the timestep's first element and
    of the values its seed would come from; ``values`` (the run fields after this call) once read."""

    __slots__ = ("t", "noise", "values")

    def __init__(self, t: torch.Tensor, noise: Optional[torch.Tensor]) -> None:
        self.t, self.noise = t, noise
        self.values: Optional[dict] = None


def _read_floats(ts: List[torch.Tensor]) -> List[float]:
    """Python floats of 1-element tensors: one device->host read per (device, dtype) group."""
    out = [0.0] * len(ts)
    groups: dict = {}
    for i, t in enumerate(ts):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        for i, v in zip(idx, torch.cat([ts[i] for i in idx]).tolist()):
            out[i] = float(v)
    return out


def _is_noop_reset(fn: Optional[Callable[[], None]]) -> bool:
    """Whether ``on_run_start`` does nothing: absent, or a method's inherited ``AttentionMethod.reset``."""
    return fn is None or getattr(fn, "__func__", None) is AttentionMethod.reset


def _run_field(name: str) -> property:
    attr = "_" + name

    def get(self):
        if self._deferred:
            self._read_deferred()
        return getattr(self, attr)

    def set(self, value) -> None:
        if self._deferred:
            self._read_deferred()
        setattr(self, attr, value)

    return property(get, set, doc=f"``{name}`` after the latest denoiser call (reads deferred calls first)")


@dataclass
class RunState:
    """What the denoiser/model hook knows about the current forward, shared by all processors of one apply().

    Step counting: ``begin_run()`` (called when the pipeline's scheduler runs ``set_timesteps``) resets the
    step; otherwise a denoiser call whose timestep is larger than the previous one starts a new run. A call
    with a new (smaller) timestep advances ``step``; repeated calls with the same timestep (separate CFG
    passes) share a step. ``seed`` is derived from the first denoiser input of a run (the initial noise).

    Deferred calls (:meth:`denoiser_call`): when reading a call's timestep would wait for the device and nothing
    needs the step at once, the call is queued and ``step``/``timestep``/``num_steps``/``seed``/``run_index``/
    ``calls`` are worked out, with the same values, when first read: as attributes here, or as fields of a
    geometry that :meth:`LayerCtx.geometry` built meanwhile.
    """

    grid: Optional[Tuple[int, ...]] = None       # token grid of the denoiser input (after patching)
    latent_hw: Optional[Tuple[int, int]] = None  # UNet: sample H, W (levels via TokenGeometry.grid_for_level)
    spatial_start: int = 0                       # timm / VLM: index of the first grid token
    spans: Tuple[Tuple[int, Tuple[int, ...]], ...] = ()
    seq_len: Optional[int] = None                # VLM: length of the captured input_ids
    cfg_chunks: int = 1
    cfg_override: Optional[int] = None           # apply(..., cfg_chunks=k)
    cfg_enabled: Optional[bool] = None           # pipeline's do_classifier_free_guidance at run start
    on_run_start: Optional[Callable[[], None]] = None  # the method's reset()
    # run fields, read through the properties below (which first read deferred calls)
    _step: Optional[int] = None
    _timestep: Optional[float] = None
    _num_steps: Optional[int] = None
    _seed: Optional[int] = None
    _run_index: int = 0
    _calls: int = 0                              # denoiser calls in this run
    _new_run: bool = True
    # pipeline runs (begin_run from the wrapped scheduler): the schedule, to read timesteps without a host sync,
    # and the CFG split, detected once per run and batch shape instead of on every call
    _scheduled: bool = False
    _schedule_ref: Optional[torch.Tensor] = None
    _schedule_host: Optional[torch.Tensor] = None
    _cfg_key: Optional[tuple] = None
    _deferred: List[_DeferredCall] = field(default_factory=list, repr=False)

    step = _run_field("step")
    timestep = _run_field("timestep")
    num_steps = _run_field("num_steps")
    seed = _run_field("seed")
    run_index = _run_field("run_index")
    calls = _run_field("calls")

    def begin_run(self, num_steps: Optional[int] = None, cfg_enabled: Optional[bool] = None,
                  timesteps: Optional[torch.Tensor] = None) -> None:
        """Mark the start of a generation (step counter and seed reset at the next denoiser call).
        ``timesteps``: the scheduler's schedule (read once here, so later calls need no device readback)."""
        self._read_deferred()  # calls so far belong to the previous run
        self._new_run = True
        self._num_steps = num_steps
        self.cfg_enabled = cfg_enabled
        self._scheduled, self._cfg_key = True, None
        ok = isinstance(timesteps, torch.Tensor) and timesteps.dim() == 1 and timesteps.numel() > 0
        self._schedule_ref = timesteps if ok else None
        self._schedule_host = timesteps.detach().to("cpu", torch.float64) if ok else None

    def _host_timestep(self, t: Any) -> Tuple[bool, Optional[float]]:
        """``(True, value)`` when ``t`` can be read without waiting for the device (None, a number, a view of
        the schedule recorded by :meth:`begin_run`), else ``(False, None)``."""
        if t is None:
            return True, None
        if isinstance(t, (int, float)):
            return True, float(t)
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return True, None
        ref, host = self._schedule_ref, self._schedule_host
        if (ref is not None and t.device == ref.device and t.dtype == ref.dtype
                and t.untyped_storage().data_ptr() == ref.untyped_storage().data_ptr()):
            i, rem = divmod(t.storage_offset() - ref.storage_offset(), ref.stride(0))
            if rem == 0 and 0 <= i < host.numel():
                return True, float(host[i])
        return False, None

    def timestep_value(self, t: Any) -> Optional[float]:
        """The denoiser's ``timestep`` argument as a float. A tensor that views the scheduler's schedule (what
        pipelines pass: ``timesteps[i]``, possibly ``.expand(B)``) is read from the host copy made in
        :meth:`begin_run`, without waiting for the GPU; anything else is read from the tensor."""
        ok, value = self._host_timestep(t)
        return value if ok else float(t.reshape(-1)[0])

    def denoiser_call(self, t: Any, sample: Optional[torch.Tensor]) -> None:
        """:meth:`on_denoiser_call` with the ``timestep`` argument as passed to the denoiser.

        A timestep tensor that only a device readback can give (not a view of the schedule: Flux pipelines pass
        ``timestep / 1000``, a new tensor each step) is not read now when nothing needs the step yet: the
        method's ``reset`` is the base no-op (so running it late changes nothing) and the CFG split does not
        depend on the run (batch 1, or detected on every call anyway). The call is queued with device copies of
        the timestep and of the seed's input values; the queue is read (one readback) on first access to a run
        field, at :meth:`begin_run`, at the next eager call, or once it holds ``_MAX_DEFERRED`` calls. Any
        other call is read at once, as before."""
        ok, value = self._host_timestep(t)
        if ok or not self._can_defer(sample):
            self.on_denoiser_call(value if ok else float(t.reshape(-1)[0]), sample)
            return
        cfg = self._detect_cfg(sample)  # what _cfg_for gives here (see _can_defer), without the run's cache
        noise = None
        if sample is not None:  # what seed_from_tensor would read, should this call turn out to start a run
            noise = sample.detach().chunk(cfg)[0].reshape(-1)[:_SEED_VALUES].to(torch.float32, copy=True)
        self._deferred.append(_DeferredCall(t.detach().reshape(-1)[:1].clone(), noise))
        self.cfg_chunks = cfg
        if len(self._deferred) >= _MAX_DEFERRED:
            self._read_deferred()

    def _can_defer(self, sample: Optional[torch.Tensor]) -> bool:
        if not _is_noop_reset(self.on_run_start):
            return False  # the method resets per run: it must see the run start before its first attention call
        # in pipeline runs a batch of several may hit the CFG cache, keyed on the run: needs the bookkeeping now
        # (_scheduled may only turn False while calls are deferred, so True here is the safe side)
        return not (sample is not None and sample.shape[0] > 1 and self.cfg_override is None
                    and self.cfg_enabled is not False and self._scheduled)

    def on_denoiser_call(self, timestep: Optional[float], sample: Optional[torch.Tensor]) -> None:
        """Update step/timestep/cfg/seed for one denoiser forward."""
        if self._deferred:
            self._read_deferred()
        new_run = self._advance(timestep)
        self.cfg_chunks = self._cfg_for(sample)
        if new_run:
            # seed from the noise of the first CFG chunk, so it does not depend on the guidance setting
            self._start_run(seed_from_tensor(sample.chunk(self.cfg_chunks)[0]) if sample is not None else None)
        self._calls += 1
        self._timestep = timestep

    def _advance(self, timestep: Optional[float]) -> bool:
        """Step/run bookkeeping of one call with this timestep; returns whether it starts a run."""
        new_run = self._new_run or self._step is None or (
            timestep is not None and self._timestep is not None and timestep > self._timestep)
        if new_run:
            if not self._new_run:  # detected by timestep increase: the previous run's step count is stale
                self._num_steps = None
                self._scheduled, self._schedule_ref, self._schedule_host = False, None, None
            self._new_run = False
            self._run_index += 1
            self._step, self._calls = 0, 0
        elif timestep is not None and timestep != self._timestep:
            self._step += 1
        return new_run

    def _start_run(self, seed: Optional[int]) -> None:
        self._seed = seed
        if self.on_run_start is not None:
            self.on_run_start()

    def _read_deferred(self) -> None:
        """Read the deferred calls' timesteps (one readback) and do their bookkeeping in order."""
        pending = self._deferred
        if not pending:
            return
        ts = _read_floats([p.t for p in pending])
        self._deferred = []
        for p, t in zip(pending, ts):
            if self._advance(t):
                self._start_run(seed_from_tensor(p.noise) if p.noise is not None else None)
            self._calls += 1
            self._timestep = t
            p.values = {"step": self._step, "timestep": t, "num_steps": self._num_steps, "seed": self._seed}
            p.t = p.noise = None

    def _deferred_values(self, call: _DeferredCall) -> dict:
        if call.values is None:
            self._read_deferred()
        return call.values

    def _cfg_for(self, sample: Optional[torch.Tensor]) -> int:
        """CFG chunks of this call: in pipeline runs detected once per (run, batch shape) -- batched CFG repeats
        the latents on every step -- elsewhere on every call."""
        if self.cfg_override is not None or self.cfg_enabled is False or sample is None or not self._scheduled:
            return self._detect_cfg(sample)
        key = (self._run_index, tuple(sample.shape), sample.device)
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
        if s._deferred:  # the run fields are filled in when read (one readback then; none if never read)
            return TokenGeometry._deferred(
                functools.partial(s._deferred_values, s._deferred[-1]), batch=q.shape[0], heads=q.shape[1],
                seq_len=q.shape[2], kv_len=k.shape[2], grid=grid, spatial_start=spatial_start if grid is not None
                else 0, cfg_chunks=s.cfg_chunks, layer=self.name, is_cross=self.kind == "cross", spans=spans,
                base_grid=base_grid, head_dim=q.shape[-1])
        return TokenGeometry(batch=q.shape[0], heads=q.shape[1], seq_len=q.shape[2], kv_len=k.shape[2], grid=grid,
                             spatial_start=spatial_start if grid is not None else 0, cfg_chunks=s.cfg_chunks,
                             step=s._step, timestep=s._timestep, num_steps=s._num_steps, layer=self.name,
                             is_cross=self.kind == "cross", seed=s._seed, spans=spans, base_grid=base_grid,
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
