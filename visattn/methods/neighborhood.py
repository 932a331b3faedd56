"""Neighborhood attention (NA, dilated, strided/generalized, causal; 1-D/2-D/3-D) on the block-sparse backbone.

``neighborhood_attention`` is the functional core; :class:`Neighborhood` is the method config used with
``visattn.apply``. Semantics are NATTEN's (see ``_na_mask``); layouts are tiled and cached (``_na_layout``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..geometry import TokenGeometry
from ..kernels.dispatch import block_sparse_attention
from ..kernels.layout import BlockLayout
from ._na_layout import auto_block_size, block_counts, get_layout
from ._na_mask import NASpec, make_mask_mod
from .base import AttentionMethod, register_method
from ..kernels import check_backend_name

__all__ = ["neighborhood_attention", "neighborhood_layout", "Neighborhood"]

_log = logging.getLogger("visattn")
_MAX_DENSE_WITH_MASK = 16384

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


def _per_axis(value, ndim: int, name: str, kind=int) -> tuple:
    """Broadcast an int/bool (or check a per-axis sequence) to a tuple of length ``ndim``."""
    def ok(x):
        if kind is bool:
            return isinstance(x, bool)
        return isinstance(x, Integral) and not isinstance(x, bool)

    if ok(value):
        return (kind(value),) * ndim
    if isinstance(value, (tuple, list)) and all(ok(x) for x in value):
        if len(value) != ndim:
            raise ValueError(f"{name} has {len(value)} values but spatial_shape has {ndim} axes: {tuple(value)}")
        return tuple(kind(x) for x in value)
    want = "a bool or a tuple of bools" if kind is bool else "an int or a tuple of ints"
    raise TypeError(f"{name} must be {want} (one per axis), got {value!r}")


def _global_counts(num_global_tokens) -> Tuple[int, int]:
    if isinstance(num_global_tokens, Integral) and not isinstance(num_global_tokens, bool):
        pre, suf = int(num_global_tokens), 0
    elif (isinstance(num_global_tokens, (tuple, list)) and len(num_global_tokens) == 2
          and all(isinstance(x, Integral) and not isinstance(x, bool) for x in num_global_tokens)):
        pre, suf = (int(x) for x in num_global_tokens)
    else:
        raise TypeError(f"num_global_tokens must be an int (prefix) or a (prefix, suffix) pair of ints, "
                        f"got {num_global_tokens!r}")
    if pre < 0 or suf < 0:
        raise ValueError(f"num_global_tokens must be >= 0, got {num_global_tokens!r}")
    return pre, suf


def make_spec(spatial_shape, kernel_size, dilation=1, stride=1, is_causal=False, num_global_tokens=0) -> NASpec:
    """Validate NATTEN-style arguments and return the normalised :class:`NASpec` (clear errors)."""
    if isinstance(spatial_shape, Integral) and not isinstance(spatial_shape, bool):
        spatial_shape = (int(spatial_shape),)
    if not (isinstance(spatial_shape, (tuple, list, torch.Size)) and 1 <= len(spatial_shape) <= 3
            and all(isinstance(x, Integral) and not isinstance(x, bool) for x in spatial_shape)):
        raise TypeError(f"spatial_shape must be a tuple of 1 to 3 ints, got {spatial_shape!r}")
    shape = tuple(int(x) for x in spatial_shape)
    if min(shape) < 1:
        raise ValueError(f"spatial_shape extents must be >= 1, got {shape}")
    nd = len(shape)
    k = _per_axis(kernel_size, nd, "kernel_size")
    d = _per_axis(dilation, nd, "dilation")
    s = _per_axis(stride, nd, "stride")
    c = _per_axis(is_causal, nd, "is_causal", bool)
    pre, suf = _global_counts(num_global_tokens)
    for a in range(nd):
        if k[a] < 2:
            raise ValueError(f"kernel_size must be >= 2 on every axis, got kernel_size={k}")
        if d[a] < 1:
            raise ValueError(f"dilation must be >= 1 on every axis, got dilation={d}")
        if s[a] < 1 or s[a] > k[a]:
            raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size on every axis, got stride={s}, "
                             f"kernel_size={k}")
        if k[a] * d[a] > shape[a]:
            raise ValueError(f"kernel_size * dilation cannot exceed the extent on any axis, got "
                             f"spatial_shape={shape}, kernel_size={k}, dilation={d}")
    return NASpec(shape, k, d, s, c, pre, suf)


def clipped_spec(grid: Tuple[int, ...], kernel_size, dilation, stride, is_causal, prefix: int,
                 suffix: int) -> NASpec:
    """Spec for a model grid: the kernel is clipped to the extent, then dilation and stride to fit it."""
    nd = len(grid)
    k0 = _per_axis(kernel_size, nd, "kernel_size")
    d0 = _per_axis(dilation, nd, "dilation")
    s0 = _per_axis(stride, nd, "stride")
    c = _per_axis(is_causal, nd, "is_causal", bool)
    k = tuple(min(ka, L) for ka, L in zip(k0, grid))
    d = tuple(max(1, min(da, L // ka)) for da, ka, L in zip(d0, k, grid))
    s = tuple(min(sa, ka) for sa, ka in zip(s0, k))
    return NASpec(tuple(grid), k, d, s, c, prefix, suffix)


def _blocks(block_size, device, head_dim: int, spec: NASpec) -> Tuple[int, int]:
    bs = block_size or auto_block_size(spec, device, head_dim)
    return (bs, bs) if isinstance(bs, int) else tuple(bs)


def _attend(q, k, v, spec: NASpec, scale, backend: str, block_size, kernel_order: bool = False) -> torch.Tensor:
    if spec.is_dense and backend == "auto":  # every key for every query: order-independent dense attention
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    bs = _blocks(block_size, q.device, q.shape[-1], spec)
    layout = get_layout(spec, bs, q.device, kernel_order=kernel_order)
    return block_sparse_attention(q, k, v, layout, scale=scale, backend=backend)


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, spatial_shape: Sequence[int],
                           kernel_size: IntOrTuple, dilation: IntOrTuple = 1, stride: IntOrTuple = 1,
                           is_causal: BoolOrTuple = False, scale: Optional[float] = None, backend: str = "auto",
                           num_global_tokens: Union[int, Tuple[int, int]] = 0,
                           block_size: Optional[Union[int, Tuple[int, int]]] = None,
                           kernel_order: bool = False) -> torch.Tensor:
    """Neighborhood attention with NATTEN's semantics on (B, H, N, D) tensors (k/v may have fewer heads).

    The sequence is ``[prefix globals][prod(spatial_shape) grid tokens, row-major][suffix globals]``.
    ``num_global_tokens``: an int (that many prefix tokens, e.g. CLS/registers) or ``(prefix, suffix)``
    (e.g. text tokens after the image in joint attention). Global tokens attend to every token and every
    token attends to them. ``kernel_size``, ``dilation``, ``stride`` and ``is_causal`` take one value or
    one per axis. ``backend``: "auto" (Triton on CUDA, exact dense reference on CPU), "triton", "flex",
    "sdpa". With kernel == extent on every axis and nothing causal, "auto" runs plain dense SDPA.
    ``block_size`` overrides the kernel's (query, key) block sizes. ``kernel_order=True``: q/k/v are already
    in the layout's token order (``x[..., neighborhood_layout(...).perm_q, :]``) and so is the output, which
    skips the gather/scatter (keep a whole network in kernel order: per-token layers commute with it).
    Returns (B, H, N, D).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise TypeError(f"{name} must be a 4-D tensor (B, H, N, D), got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
    spec = make_spec(spatial_shape, kernel_size, dilation, stride, is_causal, num_global_tokens)
    if q.shape[2] != spec.seq_len or k.shape[2] != spec.seq_len:
        raise ValueError(f"spatial_shape {spec.shape} with {spec.prefix}+{spec.suffix} global tokens needs "
                         f"N={spec.seq_len} tokens, but q has {q.shape[2]} and k has {k.shape[2]}")
    return _attend(q, k, v, spec, scale, backend, block_size, kernel_order)


def neighborhood_layout(spatial_shape: Sequence[int], kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                        stride: IntOrTuple = 1, is_causal: BoolOrTuple = False, *,
                        num_global_tokens: Union[int, Tuple[int, int]] = 0, device="cpu",
                        head_dim: Optional[int] = None,
                        block_size: Optional[Union[int, Tuple[int, int]]] = None) -> BlockLayout:
    """The cached :class:`BlockLayout` that ``neighborhood_attention`` uses for these arguments on ``device``
    (with q's ``head_dim``, or the same ``block_size``): ``.perm_q`` maps kernel position -> original token
    (None when the tiled order is the original order, e.g. 1-D without dilation), ``.inv_perm_q`` the
    reverse, ``.stats()`` gives full/partial/empty block counts. On CUDA the block sizes (and so the token
    order) depend on the head dim, so one of ``head_dim`` / ``block_size`` is required there."""
    spec = make_spec(spatial_shape, kernel_size, dilation, stride, is_causal, num_global_tokens)
    dev = torch.device(device)
    if head_dim is None:
        if dev.type == "cuda" and block_size is None:
            raise ValueError("neighborhood_layout on CUDA needs head_dim= (q's last dim) or block_size=: the "
                             "block sizes, and so the token order, depend on it")
        head_dim = 64
    return get_layout(spec, _blocks(block_size, dev, head_dim, spec), dev)


@register_method("neighborhood")
@dataclass
class Neighborhood(AttentionMethod):
    """Neighborhood attention on the model's token grid (2-D images, 3-D video, 1-D sequences).

    Extra tokens (text in joint attention, CLS/register tokens) stay global. At grid levels smaller than
    the kernel (small UNet levels) the kernel is clipped to the extent, and dilation/stride to fit, so those
    levels become dense. Calls without a grid, cross-attention and kv_len != seq_len run dense SDPA. A model
    ``attn_mask`` (Swin's relative-position bias) is combined with the window on an exact dense path.
    """

    kernel_size: IntOrTuple = 32
    dilation: IntOrTuple = 1
    stride: IntOrTuple = 1
    is_causal: BoolOrTuple = False
    backend: str = "auto"
    block_size: Optional[Union[int, Tuple[int, int]]] = None

    def __post_init__(self) -> None:
        check_backend_name(self.backend)
        for name in ("kernel_size", "dilation", "stride"):
            val = getattr(self, name)
            vals = val if isinstance(val, (tuple, list)) else (val,)
            if not all(isinstance(x, Integral) and not isinstance(x, bool) for x in vals) or not vals:
                raise TypeError(f"{name} must be an int or a tuple of ints, got {val!r}")
            if isinstance(val, list):
                setattr(self, name, tuple(val))
        ks = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,)
        if min(ks) < 2:
            raise ValueError(f"kernel_size must be >= 2, got {self.kernel_size!r}")
        for name in ("dilation", "stride"):
            val = getattr(self, name)
            if min(val if isinstance(val, tuple) else (val,)) < 1:
                raise ValueError(f"{name} must be >= 1, got {val!r}")
        if isinstance(self.is_causal, list):
            self.is_causal = tuple(self.is_causal)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Neighborhood":
        """A documented starting point per model family (``PRESETS``; see docs/methods/neighborhood.md)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def spec_for(self, geometry: TokenGeometry) -> Optional[NASpec]:
        """The clipped problem for this geometry, or None when the call runs dense."""
        if geometry.grid is None or geometry.is_cross or geometry.kv_len != geometry.seq_len:
            return None
        spec = clipped_spec(tuple(geometry.grid), self.kernel_size, self.dilation, self.stride, self.is_causal,
                            geometry.num_prefix, geometry.num_suffix)
        return None if spec.is_dense else spec

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: TokenGeometry, *,
               scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        spec = self.spec_for(geometry)
        gqa = q.shape[1] != k.shape[1]
        if spec is None:
            _log.debug("neighborhood: dense attention at layer %r (grid=%s, cross=%s)", geometry.layer,
                       geometry.grid, geometry.is_cross)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
        if attn_mask is not None:  # e.g. Swin's relative-position bias: exact dense path with both masks
            if spec.seq_len > _MAX_DENSE_WITH_MASK:
                raise ValueError(f"Neighborhood with a model attn_mask runs densely and supports at most "
                                 f"{_MAX_DENSE_WITH_MASK} tokens, got {spec.seq_len}")
            idx = torch.arange(spec.seq_len, device=q.device)
            na = make_mask_mod(spec, q.device)(0, 0, idx[:, None], idx[None, :])
            if attn_mask.dtype == torch.bool:
                mask = attn_mask & na
            else:
                mask = attn_mask.to(q.dtype).masked_fill(~na, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        if q.shape[2] != spec.seq_len:
            raise ValueError(f"geometry says {spec.seq_len} tokens but q has {q.shape[2]}")
        return _attend(q, k, v, spec, scale, self.backend, self.block_size)

    def pattern(self, geometry: TokenGeometry, query_index: int) -> torch.Tensor:
        spec = self.spec_for(geometry)
        if spec is None:
            return torch.ones(geometry.kv_len, dtype=torch.bool)
        mm = make_mask_mod(spec)
        return mm(0, 0, torch.tensor(int(query_index)), torch.arange(geometry.kv_len)).expand(geometry.kv_len)

    def layout_stats(self, geometry: TokenGeometry, head_dim: Optional[int] = None) -> Optional[dict]:
        """Block counts of the layout for ``geometry`` with q's head dim (``head_dim``, else the geometry's,
        else 128; on CUDA the block sizes depend on it: 128x64 for some layouts when 64 < D <= 128), plus the
        block sizes used."""
        spec = self.spec_for(geometry)
        if spec is None:
            return None
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the method would run
        bs = _blocks(self.block_size, dev, head_dim or geometry.head_dim or 128, spec)
        return {**_cached_counts(spec, bs), "block_size": f"{bs[0]}x{bs[1]}"}


@lru_cache(maxsize=128)
def _cached_counts(spec: NASpec, block_size: Tuple[int, int]) -> dict:
    return block_counts(spec, block_size)


#: Starting points per model family (training-free use; not quality-measured here, see the docs).
PRESETS = {
    "sd15": dict(kernel_size=32),                      # SD 1.x/2.x UNet at 512 px: 64x64 level windowed, rest dense
    "sd15-hires": dict(kernel_size=64),                # SD 1.x beyond 512 px: the training-size window
    "sdxl": dict(kernel_size=32),                      # SDXL at 1024 px: 64x64 and 32x32 levels
    "sdxl-hires": dict(kernel_size=64),
    "flux": dict(kernel_size=32, stride=8),            # Flux / SD3 at 1024 px: 64x64 tokens, text global
    "flux-2k": dict(kernel_size=64, stride=16),        # 2048 px: 128x128 tokens
    "flux-4k": dict(kernel_size=80, stride=16),        # 4096 px: 256x256 tokens (the GNA paper's setting)
    "hunyuan-video": dict(kernel_size=(18, 24, 24), stride=(16, 8, 8)),  # 30x48x80 latent video tokens
    "vit": dict(kernel_size=7),                        # timm ViT/EVA for fine-tuning experiments (no speed-up)
}
