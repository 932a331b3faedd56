"""Cached tensors must outlive the mode they were built in: a layout or index table first built under
``torch.inference_mode()`` would be an inference tensor, and a later autograd call that saves it for backward
would fail. Cache builders run under ``inference_mode(False)`` so caches hold ordinary tensors: ``plain_tensors``
for functions that only run on a miss (under ``lru_cache``, lazy builders), an inline ``with
torch.inference_mode(False):`` around the miss branch of hot-path getters (the context costs ~3 us a call)."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def plain_tensors(fn: F) -> F:
    """Run ``fn`` outside inference mode (its results may be cached and reused under autograd)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
