"""Bi-level routing attention (BiFormer, CVPR'23): functional core and the ``"routing"`` method.

Each query region attends to all tokens of its ``topk`` most similar key regions (similarity of
region-mean queries and keys, shared by all heads). The fast path never gathers K/V: tokens are put
in region-major order and the routing becomes a block-sparse :class:`~visattn.kernels.BlockLayout`
whose routed (query region, key region) pairs are FULL blocks. See ``docs/methods/routing.md``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..kernels import block_sparse_attention  # noqa: F401  (kept importable for monkeypatching in tests)
from ..geometry import TokenGeometry
from . import _routing_core as core
from ._routing_gather import bilevel_routing_attention_gather
from .base import AttentionMethod, register_method
from ..kernels import check_backend_name

__all__ = ["bilevel_routing_attention", "bilevel_routing_attention_gather", "BiLevelRouting"]

logger = logging.getLogger("visattn")

ScaleArg = Union[float, str, None]


def _resolve_scale(scale: ScaleArg, heads: int, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, str):
        if scale != "legacy":
            raise ValueError(f"scale must be None, a float or 'legacy', got {scale!r}")
        return (heads * head_dim) ** -0.5
    return float(scale)


def _routed_attention(q, k, v, grid: core.RegionGrid, topk: int, *, scale: float, spatial_start: int,
                      mask_padding: bool, backend: str, strategy: str, block_size: Optional[int],
                      routing: Optional[torch.Tensor]):
    """Shared core: q/k/v (B, H, N, D) with the grid at ``spatial_start``; returns (out, routing)."""
    B, _, N, _ = q.shape
    if routing is None:
        routing = core.compute_routing(q, k, grid, topk, scale=scale, spatial_start=spatial_start,
                                       mask_padding=mask_padding)
    else:
        routing = core.check_routing(routing.to(q.device), B, grid)
    order = core.token_order(grid, spatial_start, N, q.device)
    R = grid.num_region_total
    path, block = core.choose_strategy(grid, order.num_work, strategy, block_size)
    core.log_strategy(grid, path, block, order.num_work)
    if order.num_work > N:  # legacy auto_pad: zero tokens fill the grid to a multiple of the regions
        def pad(x):
            return torch.cat([x, x.new_zeros(*x.shape[:2], order.num_work - N, x.shape[3])], dim=2)
        q, k, v = pad(q), pad(k), pad(v)
    if path == "dense":
        mask = core.dense_mask(routing, order, R, mask_padding=mask_padding)
        kk, vv = k, v
        if k.shape[1] != q.shape[1]:
            kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
    else:
        layout = core.build_layout(routing, order, R, block, mask_padding=mask_padding)
        out = block_sparse_attention(q, k, v, layout, scale=scale, backend=backend)
    return out[:, :, :N], routing


def bilevel_routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, spatial_shape,
                              num_regions: int, topk: int, scale: ScaleArg = None, backend: str = "auto",
                              return_routing: bool = False, mask_padding: bool = False,
                              routing: Optional[torch.Tensor] = None, strategy: str = "auto",
                              block_size: Optional[int] = None):
    """Bi-level routing attention on q/k/v (B, H, N, D), N = H_img * W_img tokens in row-major order.

    Semantics follow the released legacy BiFormer core: the grid is zero-padded right/bottom to a
    multiple of ``num_regions`` (padded tokens have q = k = v = 0 and are *not* masked, unless
    ``mask_padding=True``), cut into ``num_regions x num_regions`` regions; region descriptors are the
    means of q and k over each region and all heads; each query region keeps its ``topk`` best key
    regions by ``(q_r * scale) @ k_r^T`` (ties -> lower region index; no gradient through routing); every
    query attends all tokens of its routed regions. ``scale``: None (default) -> head_dim**-0.5 like
    SDPA; ``"legacy"`` -> (heads*head_dim)**-0.5 as in the released code; or a float.
    k/v may have fewer heads (GQA). ``routing``: optional precomputed (B|1, S*S, topk) indices.
    ``strategy``: "auto" | "aligned" | "packed" | "dense" (see ``docs/methods/routing.md``).
    Returns ``out`` (B, H, N, D), or ``(out, routing (B, S*S, topk) int64)`` when ``return_routing``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    grid = core.make_region_grid(spatial_shape, num_regions)
    n = grid.height * grid.width
    if q.shape[2] != n or k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"spatial_shape {tuple(spatial_shape)} needs N={n} tokens in q, k and v; got "
                         f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    if routing is None:
        core.check_topk(topk, grid)
    out, idx = _routed_attention(q, k, v, grid, topk, scale=_resolve_scale(scale, q.shape[1], q.shape[3]),
                                 spatial_start=0, mask_padding=mask_padding, backend=backend,
                                 strategy=strategy, block_size=block_size, routing=routing)
    return (out, idx) if return_routing else out


@register_method("routing")
@dataclass
class BiLevelRouting(AttentionMethod):
    """BiFormer bi-level routing attention for image tokens (``visattn.apply(model, "routing", ...)``).

    Options: ``num_regions`` regions per side, ``topk`` routed regions per query region,
    ``mask_padding`` (default True: padding cells of a grid that does not divide are masked, so
    ``topk = num_regions**2`` equals dense attention exactly), ``legacy_scale`` (use (heads*head_dim)**-0.5
    instead of the model's scale), ``backend`` and ``strategy`` as in :func:`bilevel_routing_attention`.
    Extra tokens (CLS, registers, text in joint attention) are global: they attend to and are attended by
    every token. Grids too small for ``num_regions`` regions, and 1-D/3-D grids, fall back to dense
    attention (logged once per grid).
    """

    num_regions: int = 7
    topk: int = 4
    mask_padding: bool = True
    legacy_scale: bool = False
    backend: str = "auto"
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.num_regions, int) or self.num_regions < 1:
            raise ValueError(f"num_regions must be a positive int, got {self.num_regions!r}")
        if not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk must be a positive int, got {self.topk!r}")
        if self.topk > self.num_regions ** 2:
            raise ValueError(f"topk={self.topk} exceeds num_regions^2={self.num_regions ** 2}")
        check_backend_name(self.backend)
        if self.strategy not in ("auto", "aligned", "packed", "dense"):
            raise ValueError(f"strategy must be one of ('auto', 'aligned', 'packed', 'dense'), "
                             f"got {self.strategy!r}")

    def _grid(self, geometry: TokenGeometry) -> Optional[core.RegionGrid]:
        g = geometry.grid
        if g is None or len(g) != 2 or geometry.is_cross or geometry.kv_len != geometry.seq_len:
            return None
        if not core.regions_fit(g, self.num_regions):
            return None
        return core.make_region_grid(g, self.num_regions)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: TokenGeometry, *,
               scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("bi-level routing attention cannot honour an attention mask from the model "
                             "(relative-position bias / padding mask); exclude this layer via `layers=`")
        grid = self._grid(geometry)
        if grid is None:
            key = ("dense", geometry.grid, geometry.is_cross)
            msg = (f"bilevel routing: layer {geometry.layer!r} with grid {geometry.grid} (cross={geometry.is_cross}) "
                   f"cannot hold {self.num_regions}x{self.num_regions} regions -> dense attention")
            (logger.debug if key in core._LOGGED else logger.info)(msg)
            core._LOGGED.add(key)
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        if self.legacy_scale:
            scale = _resolve_scale("legacy", q.shape[1], q.shape[3])
        else:
            scale = _resolve_scale(scale, q.shape[1], q.shape[3])
        out, _ = _routed_attention(q, k, v, grid, self.topk, scale=scale, spatial_start=geometry.num_prefix,
                                   mask_padding=self.mask_padding, backend=self.backend,
                                   strategy=self.strategy, block_size=None, routing=None)
        return out

    def layout_stats(self, geometry: TokenGeometry) -> Optional[dict]:
        """Path, block and block counts for ``geometry`` (batch 1). Routing depends on the data: the counts use
        an arbitrary routing; they are exact for the aligned path (every routing gives the same counts)."""
        grid = self._grid(geometry)
        if grid is None:
            return None
        order = core.token_order(grid, geometry.num_prefix, geometry.seq_len, "cpu")
        path, block = core.choose_strategy(grid, order.num_work, self.strategy)
        out = {"strategy": path, "block": block, "region_tokens": grid.region_size, "routing_dependent": path == "packed"}
        if path != "dense":
            R = grid.num_region_total
            routing = torch.arange(self.topk).expand(1, R, self.topk)
            out.update(core.build_layout(routing, order, R, block, mask_padding=self.mask_padding).stats())
        return out

    def pattern(self, geometry: TokenGeometry, query_index: int, *, q: Optional[torch.Tensor] = None,
                k: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Routing depends on the data: None unless ``q``/``k`` (B, H, N, D) are given, then the bool (kv_len,)
        row of batch element 0 for ``query_index``."""
        grid = self._grid(geometry)
        if grid is None:
            return torch.ones(geometry.kv_len, dtype=torch.bool)
        if q is None or k is None:
            return None
        scale = _resolve_scale("legacy" if self.legacy_scale else None, q.shape[1], q.shape[3])
        routing = core.compute_routing(q[:1], k[:1], grid, self.topk, scale=scale,
                                       spatial_start=geometry.num_prefix, mask_padding=self.mask_padding)
        order = core.token_order(grid, geometry.num_prefix, geometry.seq_len, q.device)
        allow = core.group_allow(routing, grid.num_region_total)[0]
        gw = order.group_w[:geometry.seq_len]
        row = allow[gw[query_index], gw]
        return row.cpu()
