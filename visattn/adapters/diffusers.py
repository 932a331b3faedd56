"""diffusers adapter: processors on the denoiser's attention modules + a ``ModelHook`` capturing geometry.

Geometry capture (``_GeometryHook.pre_forward`` on the denoiser, hook name ``"visattn"``):
- 4-D input ``sample``/``hidden_states`` (B, C, H, W): ``latent_hw = (H, W)``; ``grid = (H/p, W/p)`` with the
  model's ``patch_size`` (1 for UNets). UNet levels are mapped with ``TokenGeometry.grid_for_level`` from
  that grid (``grid=None`` when no level matches the token count).
- Flux: the packed image grid from ``img_ids`` (rows/cols of the tokens), never from the token count. Reading
  it needs a device->host read, so the hook keeps the grid of the last ids tensor and reuses it only for that
  same tensor object at the same version (``_IdsGrid``; Flux pipelines pass one ``latent_image_ids`` every step).
- 5-D video: Wan ``(B, C, F, H, W)`` with ``patch_size=(pt, ph, pw)``; CogVideoX ``(B, F, C, H, W)`` with
  ``patch_size``/``patch_size_t`` -> ``grid = (F', H', W')``.
- timestep from the ``timestep`` argument; step/CFG/seed bookkeeping in :class:`RunState` (a timestep that
  needs a device read is read only when something asks for the step, see ``RunState.denoiser_call``).
When applied to a pipeline, the scheduler's ``set_timesteps`` is wrapped (instance attribute, removed on
``remove``) to mark the start of a run and record ``num_steps`` and ``do_classifier_free_guidance``.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Dict, List, Optional

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import (AttnProcessor, AttnProcessor2_0, CogVideoXAttnProcessor2_0,
                                                  JointAttnProcessor2_0)

from ..methods.base import AttentionMethod
from .base import Installed, LayerCtx, RunState, select
from .diffusers_processors import (CogVideoXProcessor, FluxProcessor, JointProcessor, UNetProcessor, VisProcessor,
                                   WanProcessor)

__all__ = ["matches", "resolve", "plan", "install", "HOOK_NAME", "DENOISER_NAMES", "supported_processors"]

HOOK_NAME = "visattn"
DENOISER_NAMES = ("unet", "transformer", "transformer_2")


def supported_processors() -> Dict[type, type]:
    """Stock processor class -> visattn processor class."""
    table = {AttnProcessor2_0: UNetProcessor, AttnProcessor: UNetProcessor, JointAttnProcessor2_0: JointProcessor,
             CogVideoXAttnProcessor2_0: CogVideoXProcessor}
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
        table[FluxAttnProcessor] = FluxProcessor
    except ImportError:  # pragma: no cover - older diffusers
        pass
    try:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor
        table[WanAttnProcessor] = WanProcessor
    except ImportError:  # pragma: no cover
        pass
    return table


_JOINT = {JointProcessor, FluxProcessor, CogVideoXProcessor}


def _describe_supported() -> str:
    return ", ".join(sorted(c.__name__ for c in supported_processors()))


def matches(target: Any) -> bool:
    return isinstance(target, (DiffusionPipeline, ModelMixin))


def resolve(target: Any) -> List[torch.nn.Module]:
    if isinstance(target, ModelMixin):
        return [target]
    models = [getattr(target, n, None) for n in DENOISER_NAMES]
    models = [m for m in models if isinstance(m, ModelMixin)]
    if not models:
        raise TypeError(f"{type(target).__name__} has no denoiser ({' / '.join(DENOISER_NAMES)}) visattn can drive")
    return models


def _kind(module: torch.nn.Module, ours: Optional[type], stock: Any) -> str:
    if ours in _JOINT or "Joint" in type(stock).__name__:
        return "self"  # joint text+image attention is self-attention over the concatenation
    return "cross" if getattr(module, "is_cross_attention", False) else "self"


def plan(model: torch.nn.Module, layers) -> list:
    """Attention modules selected by ``layers`` with the processor class to install (validates only)."""
    table = supported_processors()
    candidates, unsupported = [], []
    for name, mod in model.named_modules():
        if not (hasattr(mod, "processor") and hasattr(mod, "set_processor")):
            continue
        proc = mod.processor
        stock = proc.original if isinstance(proc, VisProcessor) else proc
        ours = table.get(type(stock))
        kind = _kind(mod, ours, stock)
        if ours is None:
            unsupported.append((name, kind, f"{type(mod).__name__} with {type(stock).__name__}"))
        else:
            candidates.append((name, kind, (mod, stock, ours)))
    if not candidates and not unsupported:
        raise TypeError(f"{type(model).__name__} has no diffusers attention modules; visattn drives attention "
                        f"modules with processors {_describe_supported()}")
    return select(candidates, layers, model, unsupported, "attention processors " + _describe_supported())


def _grid_from_ids(ids: torch.Tensor) -> Optional[tuple]:
    """(rows, cols) spanned by the ids' row/col coordinates when they tile the tokens exactly (one readback)."""
    ids = ids[0] if ids.ndim == 3 else ids
    rc = ids[:, 1:3]
    h, w = (int(v) + 1 for v in (rc.amax(0) - rc.amin(0)).tolist())
    return (h, w) if h * w == ids.shape[0] else None


class _IdsGrid:
    """The grid of the last ``img_ids`` tensor seen (one entry), reused only for that very object -- held by a
    weak reference, so a new tensor, even at the same address, never matches -- at the same ``_version`` (any
    in-place write, also through a view or ``detach()``, bumps it), shape, strides, offset, data pointer, dtype
    and device. Inference tensors carry no version counter: their grid is read on every call.
    Not seen (PyTorch does not track them): writes through ``.data``, ``.numpy()`` or DLPack aliases."""

    __slots__ = ("_ref", "_key", "_grid")

    def __init__(self) -> None:
        self._ref: Optional[weakref.ref] = None
        self._key: Optional[tuple] = None
        self._grid: Optional[tuple] = None

    @staticmethod
    def _key_of(ids: torch.Tensor) -> Optional[tuple]:
        if ids.is_inference():
            return None
        return (ids._version, tuple(ids.shape), ids.stride(), ids.storage_offset(), ids.data_ptr(), ids.dtype,
                ids.device)

    def __call__(self, ids: torch.Tensor) -> Optional[tuple]:
        key = self._key_of(ids)
        if key is not None and self._ref is not None and self._ref() is ids and self._key == key:
            return self._grid
        grid = _grid_from_ids(ids)
        if key is None:
            self._ref = self._key = self._grid = None
        else:
            self._ref, self._key, self._grid = weakref.ref(ids), key, grid
        return grid


def _as_tuple(p, n: int) -> tuple:
    return tuple(p) if isinstance(p, (tuple, list)) else (p,) * n


def capture(model: torch.nn.Module, args: Dict[str, Any], ids_grid: Optional[_IdsGrid] = None) -> Dict[str, Any]:
    """Geometry of one denoiser call from its bound arguments: grid, latent_hw, timestep (as passed), sample.
    ``ids_grid``: the caller's cache of the Flux ``img_ids`` grid (None: read the ids)."""
    x = args.get("sample", args.get("hidden_states"))
    cfg = getattr(model, "config", {}) or {}
    out: Dict[str, Any] = {"grid": None, "latent_hw": None, "sample": x, "timestep": args.get("timestep")}
    if not isinstance(x, torch.Tensor):
        return out
    name = type(model).__name__
    if args.get("img_ids") is not None:  # Flux: packed latents, grid from the ids
        ids = args["img_ids"]
        out["grid"] = ids_grid(ids) if ids_grid is not None else _grid_from_ids(ids)
    elif x.ndim == 4:
        h, w = x.shape[-2:]
        ph, pw = _as_tuple(cfg.get("patch_size", 1) or 1, 2)[-2:]
        out["latent_hw"] = (h, w)
        out["grid"] = (h // ph, w // pw)
    elif x.ndim == 5:
        if "CogVideoX" in name:  # (B, F, C, H, W)
            f, h, w = x.shape[1], x.shape[3], x.shape[4]
            p = cfg.get("patch_size", 1)
            pt = cfg.get("patch_size_t", None) or 1
            out["grid"] = (f // pt, h // p, w // p)
        else:  # (B, C, F, H, W)
            pt, ph, pw = _as_tuple(cfg.get("patch_size", 1), 3)
            out["grid"] = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        out["latent_hw"] = tuple(x.shape[-2:])
    return out


class _GeometryHook(ModelHook):
    """Records the denoiser call's geometry and step on the shared :class:`RunState`."""

    def __init__(self, state: RunState) -> None:
        super().__init__()
        self.state = state
        self._sig = None
        self._ids_grid = _IdsGrid()

    def pre_forward(self, module, *args, **kwargs):
        if self._sig is None:
            self._sig = inspect.signature(type(module).forward)
        try:
            bound = self._sig.bind_partial(module, *args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        info = capture(module, bound, self._ids_grid)
        self.state.grid, self.state.latent_hw = info["grid"], info["latent_hw"]
        self.state.denoiser_call(info["timestep"], info["sample"])
        return args, kwargs


def _install_hook(model: torch.nn.Module, state: RunState, inst: Installed) -> None:
    had_registry = hasattr(model, "_diffusers_hook")
    had_forward = "forward" in model.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_GeometryHook(state), HOOK_NAME)

    def undo() -> None:
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks:
            if not had_forward:
                model.__dict__.pop("forward", None)
            if not had_registry:
                model.__dict__.pop("_diffusers_hook", None)

    inst.undo.append(undo)


def _wrap_scheduler(pipe: Any, state: RunState, inst: Installed) -> None:
    sched = getattr(pipe, "scheduler", None)
    if sched is None or not hasattr(sched, "set_timesteps"):
        return
    had = "set_timesteps" in sched.__dict__
    prev = sched.__dict__.get("set_timesteps")
    orig = sched.set_timesteps

    @functools.wraps(orig)  # pipelines inspect its signature (retrieve_timesteps checks for sigmas=)
    def set_timesteps(*a, **k):
        out = orig(*a, **k)
        n = getattr(sched, "num_inference_steps", None)
        if n is None and getattr(sched, "timesteps", None) is not None:
            n = len(sched.timesteps)
        try:
            cfg = pipe.do_classifier_free_guidance
        except Exception:  # property not defined or its inputs not set yet
            cfg = None
        state.begin_run(n, cfg if isinstance(cfg, bool) else None, getattr(sched, "timesteps", None))
        return out

    sched.set_timesteps = set_timesteps

    def undo() -> None:
        if had:
            sched.set_timesteps = prev
        else:
            sched.__dict__.pop("set_timesteps", None)

    inst.undo.append(undo)


def install(target: Any, model: torch.nn.Module, chosen: list, method: AttentionMethod, state: RunState) -> Installed:
    inst = Installed()
    try:
        for name, kind, (mod, stock, ours) in chosen:
            ctx = LayerCtx(name, kind, method, state)
            mod.set_processor(ours(ctx, stock))
            inst.layers.append(name)
            inst.contexts.append(ctx)
            inst.undo.append(lambda mod=mod, stock=stock: mod.set_processor(stock))
        _install_hook(model, state, inst)
        if isinstance(target, DiffusionPipeline):
            _wrap_scheduler(target, state, inst)
    except BaseException:
        inst.remove()
        raise
    return inst
