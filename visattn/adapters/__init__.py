"""Adapters: find a model family's attention modules, capture token geometry, install visattn processors.

Each adapter module exposes ``matches(target)``, ``resolve(target) -> [model]``, ``plan(model, layers)``
(validates, touches nothing) and ``install(target, model, plan, method, state) -> Installed``.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from .base import Installed, LayerCtx, RunState, layer_filter

__all__ = ["find_adapter", "RunState", "LayerCtx", "Installed", "layer_filter", "SUPPORTED"]

SUPPORTED = ("a diffusers DiffusionPipeline (unet/transformer) or ModelMixin, a timm model, "
             "or a transformers PreTrainedModel")


def _from_library(obj: Any, lib: str) -> bool:
    return lib in sys.modules and any(c.__module__.split(".")[0] == lib for c in type(obj).__mro__)


def find_adapter(target: Any) -> ModuleType:
    """The adapter module for ``target``; ``TypeError`` naming the class and what is supported otherwise."""
    if _from_library(target, "diffusers"):
        from . import diffusers as a
    elif _from_library(target, "transformers"):
        from . import transformers as a
    elif _from_library(target, "timm"):
        from . import timm as a
    else:
        raise TypeError(f"visattn cannot drive a {type(target).__module__}.{type(target).__qualname__}; "
                        f"expected {SUPPORTED}")
    if not a.matches(target):
        raise TypeError(f"visattn cannot drive a {type(target).__qualname__}; expected {SUPPORTED}")
    return a
