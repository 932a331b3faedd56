"""`block_sparse_attention`: one entry point, backends ``triton | flex | xformers | sdpa``.

Every backend computes in *kernel order* (the layout's permuted token order); this module applies
the permutation to q/k/v and inverts it on the output unless the backend says it does that itself
(``Backend.handles_permutation``). Backends register with :func:`register_backend`; each has a probe
that says whether it can run a given call and why not.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .layout import BlockLayout
from .reference import masked_attention

__all__ = ["block_sparse_attention", "register_backend", "available_backends", "check_backend_name", "Backend", "BACKENDS"]


@dataclass
class Backend:
    """A kernel implementation. ``fn(q, k, v, layout, scale, return_lse)`` gets kernel-order tensors
    (unless ``handles_permutation``) and returns ``out`` or ``(out, lse)``. ``probe(q, layout, needs_grad)``
    returns ``None`` when it can run, else the reason it cannot."""

    name: str
    fn: Callable
    probe: Callable[[torch.Tensor, BlockLayout, bool], Optional[str]]
    handles_permutation: bool = False


BACKENDS: Dict[str, Backend] = {}
_log = logging.getLogger("visattn")


def register_backend(backend: Backend) -> Backend:
    """Add or replace a backend by name."""
    BACKENDS[backend.name] = backend
    return backend


def available_backends(q: Optional[torch.Tensor] = None, layout: Optional[BlockLayout] = None,
                       needs_grad: bool = False) -> List[str]:
    """Names of backends that can run (for a given q/layout when passed)."""
    _load_optional_backends()
    q = q if q is not None else torch.empty(1, 1, 1, 64)
    return [n for n, b in BACKENDS.items() if layout is None or b.probe(q, layout, needs_grad) is None]


# ---------------------------------------------------------------------- sdpa: exact dense reference
def _sdpa_fn(q, k, v, layout: BlockLayout, scale, return_lse):
    mask = layout.to_dense(original_order=False)
    return masked_attention(q, k, v, mask, scale=scale, return_lse=return_lse)


def _sdpa_probe(q, layout, needs_grad):
    return None


register_backend(Backend("sdpa", _sdpa_fn, _sdpa_probe))

_OPTIONAL_LOADED = False


def _load_optional_backends() -> None:
    """Import the modules that register the triton/flex/xformers backends (each probes lazily)."""
    global _OPTIONAL_LOADED
    if _OPTIONAL_LOADED:
        return
    _OPTIONAL_LOADED = True
    import importlib

    for mod in ("triton_backend", "flex_backend", "xformers_backend"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ImportError as e:  # module not written yet or dependency missing: backend simply absent
            if not str(e).startswith("No module named"):
                raise


def check_backend_name(name: str, param: str = "backend") -> str:
    """Raise ``ValueError`` naming ``param`` unless ``name`` is "auto" or a registered backend (for method configs,
    so a typo fails when the method is built, not at the first forward deep inside a model)."""
    _load_optional_backends()
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"{param} must be one of {['auto', *BACKENDS]}, got {name!r}")
    return name


def _pick_auto(q: torch.Tensor, layout: BlockLayout, needs_grad: bool) -> str:
    forced = os.environ.get("VISATTN_BACKEND")
    if forced:
        return forced
    if q.is_cuda and "triton" in BACKENDS:
        why = BACKENDS["triton"].probe(q, layout, needs_grad)
        if why is None:
            return "triton"
        _log.warning("block_sparse_attention: triton cannot run this call (%s); using the dense 'sdpa' reference, "
                     "which builds the full (Nq, Nk) mask", why)
    return "sdpa"


def _permute(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    return x if perm is None else x.index_select(2, perm)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           scale: Optional[float] = None, backend: str = "auto", return_lse: bool = False):
    """Attention restricted to ``layout``; q (B, H, Nq, D), k/v (B, H_kv, Nk, D) as in F.sdpa.

    Returns (B, H, Nq, D) in original token order (and the fp32 log-sum-exp (B, H, Nq) when
    ``return_lse``). Rows with no kept key return 0 and LSE -inf. ``backend``: "auto" (triton on CUDA,
    else the exact dense reference), "triton", "flex", "xformers" or "sdpa".
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share batch and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    layout.check_compatible(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}; use layout.to(q.device)")
    _load_optional_backends()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = _pick_auto(q, layout, needs_grad) if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: 'auto', " + ", ".join(repr(n) for n in BACKENDS))
    be = BACKENDS[name]
    why = be.probe(q, layout, needs_grad)
    if why is not None:
        raise RuntimeError(f"backend {name!r} cannot run this call: {why}")
    if be.handles_permutation:
        return be.fn(q, k, v, layout, scale, return_lse)
    res = be.fn(_permute(q, layout.perm_q), _permute(k, layout.perm_k), _permute(v, layout.perm_k),
                layout, scale, return_lse)
    inv = layout.inv_perm_q
    if return_lse:
        out, lse = res
        if inv is not None:
            out, lse = out.index_select(2, inv), lse.index_select(2, inv)
        return out, lse
    return res if inv is None else res.index_select(2, inv)
