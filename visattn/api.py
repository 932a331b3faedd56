"""Public entry points: ``apply(target, method, layers=..., **options) -> Handle`` and ``remove(target)``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from .adapters import find_adapter
from .adapters.base import LayerSpec, RunState
from .geometry import TokenGeometry
from .methods.base import AttentionMethod, get_method

__all__ = ["apply", "remove", "Handle", "active_handle"]

# the Handle driving a model is kept on the model (plain attribute, not in state_dict; a module-level map
# would keep every applied model alive)
_ATTR = "_visattn_handle"


def _get(model: torch.nn.Module) -> Optional["Handle"]:
    return model.__dict__.get(_ATTR)


class Handle:
    """What ``apply`` installed. Use as a context manager or call ``.remove()`` (idempotent)."""

    def __init__(self, target: Any, method: AttentionMethod, layers: LayerSpec, state: RunState) -> None:
        self.target, self.method, self.layers_spec, self.state = target, method, layers, state
        self._installs: List[tuple] = []  # (model, Installed)

    @property
    def layers(self) -> List[str]:
        """Qualified names of the attention modules the method drives."""
        return [n for _, inst in self._installs for n in inst.layers]

    def geometries(self) -> Dict[str, Optional[TokenGeometry]]:
        """Layer name -> the TokenGeometry of its latest attention call (None before the first call)."""
        return {c.name: c.last_geometry for _, inst in self._installs for c in inst.contexts}

    @property
    def active(self) -> bool:
        return bool(self._installs)

    def remove(self) -> None:
        """Restore the original processors / forwards / attention implementation exactly."""
        while self._installs:
            model, inst = self._installs.pop()
            inst.remove()
            if _get(model) is self:
                del model.__dict__[_ATTR]

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = f"{len(self.layers)} layers" if self.active else "removed"
        return f"Handle({type(self.target).__name__}, {self.method!r}, {state})"


def apply(target: Any, method: Union[str, AttentionMethod], *, layers: LayerSpec = "self",
          cfg_chunks: Optional[int] = None, **options: Any) -> Handle:
    """Make ``target``'s attention use ``method``.

    Args:
        target: a diffusers ``DiffusionPipeline`` (its ``unet``/``transformer``), a diffusers ``ModelMixin``, a
            timm model or a transformers ``PreTrainedModel``.
        method: a registered name (``visattn.list_methods()``) or an ``AttentionMethod`` instance.
        layers: "self" (default), "cross", "all", a regex searched in module names, or ``callable(name)``.
            Joint text+image attention (SD3, Flux, CogVideoX) counts as "self".
        cfg_chunks: force the CFG split of the batch (default: detected, see ``docs/ARCHITECTURE.md``).
        **options: the method's options (unknown ones raise ``ValueError``).

    Applying to a model that already has a visattn method replaces it. Returns a :class:`Handle`.
    """
    m = get_method(method, **options)
    if cfg_chunks is not None and (not isinstance(cfg_chunks, int) or cfg_chunks < 1):
        raise ValueError(f"cfg_chunks must be a positive int or None, got {cfg_chunks!r}")
    adapter = find_adapter(target)
    models = adapter.resolve(target)
    plans = [(model, adapter.plan(model, layers)) for model in models]  # validates before touching anything
    for model in models:
        old = _get(model)
        if old is not None:
            old.remove()
    m.reset()
    state = RunState(cfg_override=cfg_chunks, cfg_chunks=cfg_chunks or 1, on_run_start=m.reset)
    handle = Handle(target, m, layers, state)
    try:
        for model, plan in plans:
            inst = adapter.install(target, model, plan, m, state)
            handle._installs.append((model, inst))
            model.__dict__[_ATTR] = handle
    except BaseException:
        handle.remove()
        raise
    return handle


def remove(target: Any) -> bool:
    """Remove whatever visattn installed on ``target`` (pipeline or model). Returns True if anything was removed."""
    adapter = find_adapter(target)
    removed = False
    for model in adapter.resolve(target):
        h = _get(model)
        if h is not None:
            h.remove()
            removed = True
    return removed


def active_handle(model: torch.nn.Module) -> Optional[Handle]:
    """The Handle currently driving ``model`` (a denoiser / timm model / PreTrainedModel), or None."""
    return _get(model)
