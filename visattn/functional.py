"""Functional API: method cores on (B, H, N, D) tensors, no model required."""
from .kernels import block_sparse_attention  # noqa: F401
from .methods import neighborhood as _na, routing as _ra

__all__ = ["block_sparse_attention"]
for _m, _fn in ((_na, "neighborhood_attention"), (_ra, "bilevel_routing_attention")):
    if hasattr(_m, _fn):
        globals()[_fn] = getattr(_m, _fn)
        __all__.append(_fn)
