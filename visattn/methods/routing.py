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
from . import _routing_layout as rl
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


_DECISIONS: dict = {}


def _decide(grid: core.RegionGrid, spatial_start: int, q: torch.Tensor, strategy: str, block_size: Optional[int],
            dense_threshold: Optional[int], mask_padding: bool, backend: str = "auto"):
    """Path, block, token order and plan for one call geometry (cached: the per-call Python work is a dict hit).
    The default small-problem threshold applies with ``backend="auto"`` only: a named backend is honoured."""
    B, H, N, _ = q.shape
    key = (grid, spatial_start, B, H, N, q.device, strategy, block_size, dense_threshold, mask_padding, backend,
           core.DENSE_SCORES_THRESHOLD, core.DENSE_MASK_MAX_ELEMS, core.DENSE_MAX_TOKENS)
    d = _DECISIONS.get(key)
    if d is None:
        order = core.token_order(grid, spatial_start, N, q.device)
        thr = dense_threshold
        if thr is None:
            thr = core.DENSE_SCORES_THRESHOLD if (q.device.type == "cuda" and backend == "auto") else 0
        path, block, reason = core._choose(grid, order.num_work, strategy, block_size, B * H, thr, B)
        plan = None if path == "dense" else rl.get_plan(grid, spatial_start, N, block, mask_padding=mask_padding,
                                                        device=q.device)
        d = _DECISIONS[key] = (order, path, block, reason, plan, thr)
        if len(_DECISIONS) > 256:
            _DECISIONS.pop(next(iter(_DECISIONS)))
    return d


def _routed_attention(q, k, v, grid: core.RegionGrid, topk: int, *, scale: float, spatial_start: int,
                      mask_padding: bool, backend: str, strategy: str, block_size: Optional[int],
                      routing: Optional[torch.Tensor], dense_threshold: Optional[int] = None):
    """Shared core: q/k/v (B, H, N, D) with the grid at ``spatial_start``; returns (out, routing).

    No host synchronisation on the aligned path (routing, layout, permutation and the Triton launch); the
    packed path has one (its list widths), a user-given ``routing`` one (its range check).
    """
    B, H, N, _ = q.shape
    order, path, block, reason, plan, thr = _decide(grid, spatial_start, q, strategy, block_size, dense_threshold,
                                                    mask_padding, backend)
    nw = order.num_work
    core.log_strategy(grid, path, block, nw, reason, B * H * nw * nw, thr)

    def get_routing():
        if routing is None:
            return core.compute_routing(q, k, grid, topk, scale=scale, spatial_start=spatial_start,
                                        mask_padding=mask_padding)
        return core.check_routing(routing.to(q.device), B, grid)

    if path == "dense":
        idx = get_routing()
        if nw > N:  # legacy auto_pad: zero tokens fill the grid to a multiple of the regions
            q, k, v = (F.pad(t, (0, 0, 0, nw - N)) for t in (q, k, v))
        mask = core.dense_bias(idx, order, grid, mask_padding=mask_padding, dtype=q.dtype)
        kk, vv = k, v
        if k.shape[1] != q.shape[1]:
            kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
        return out[:, :, :N], idx
    # the region-major copies first: they do not depend on the routing, so the GPU runs them while the host
    # issues the routing and layout kernels
    qp, kp, vp = plan.permute_in(q), plan.permute_in(k), plan.permute_in(v)
    idx = get_routing()
    if plan.aligned:
        layout = rl.direct_layout(plan, idx)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            rl.attach_backward_lists(layout, plan, idx)
    else:
        layout = rl.packed_layout(plan, idx)
    out = block_sparse_attention(qp, kp, vp, layout, scale=scale, backend=backend)
    return plan.permute_out(out), idx


def bilevel_routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, spatial_shape,
                              num_regions: int, topk: int, scale: ScaleArg = None, backend: str = "auto",
                              return_routing: bool = False, mask_padding: bool = False,
                              routing: Optional[torch.Tensor] = None, strategy: str = "auto",
                              block_size: Optional[int] = None, dense_threshold: Optional[int] = None):
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
    ``dense_threshold``: small-problem fallback of ``strategy="auto"``: masked dense SDPA (exact, same result)
    when ``B * H * Nw**2 <= dense_threshold``; None = ``_routing_core.DENSE_SCORES_THRESHOLD`` on CUDA with
    ``backend="auto"`` and 0 (off) elsewhere, including any named backend; 0 disables it.
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
                                 strategy=strategy, block_size=block_size, routing=routing,
                                 dense_threshold=dense_threshold)
    return (out, idx.contiguous()) if return_routing else out


@register_method("routing")
@dataclass
class BiLevelRouting(AttentionMethod):
    """BiFormer bi-level routing attention for image tokens (``visattn.apply(model, "routing", ...)``).

    Options: ``num_regions`` regions per side, ``topk`` routed regions per query region,
    ``mask_padding`` (default True: padding cells of a grid that does not divide are masked, so
    ``topk = num_regions**2`` equals dense attention exactly), ``legacy_scale`` (use (heads*head_dim)**-0.5
    instead of the model's scale), ``backend``, ``strategy`` and ``dense_threshold`` (small-problem fallback)
    as in :func:`bilevel_routing_attention`.
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
    dense_threshold: Optional[int] = None

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
        if self.dense_threshold is not None and (not isinstance(self.dense_threshold, int)
                                                 or isinstance(self.dense_threshold, bool)
                                                 or self.dense_threshold < 0):
            raise ValueError(f"dense_threshold must be None or an int >= 0, got {self.dense_threshold!r}")

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
                                   strategy=self.strategy, block_size=None, routing=None,
                                   dense_threshold=self.dense_threshold)
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
