"""Bi-level routing attention internals: region grid, routing, and the region-major BlockLayout.

Token orders used here:

* *original*: the caller's sequence ``[prefix][grid tokens, row-major][suffix]`` of length ``N``.
* *working*: original tokens followed by ``P`` zero tokens that fill the grid up to a multiple of the
  region count (legacy ``auto_pad``); ``P = 0`` when the grid divides. Length ``N + P``.
* *kernel*: region-major: all tokens of region 0 (row-major inside the region, padded cells included),
  region 1, ..., region ``S*S - 1``, then the extra (prefix, suffix) tokens. ``perm[i]`` is the working
  index held at kernel position ``i`` (the ``BlockLayout.perm_q/perm_k`` convention).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

from ._cache import plain_tensors

from ..kernels.layout import BlockLayout

logger = logging.getLogger("visattn")

MIN_TILE = 16  #: smallest block the Triton kernel runs (tl.dot needs M, N, K >= 16)
MAX_TILE = 128
DENSE_MAX_TOKENS = 8192  #: regions below MIN_TILE tokens: masked dense SDPA up to this many tokens, else packed


@dataclass(frozen=True)
class RegionGrid:
    """An ``H x W`` grid split into ``S x S`` regions of ``rh x rw`` cells after zero-padding right/bottom."""

    height: int
    width: int
    num_regions: int

    @property
    def rh(self) -> int:
        return math.ceil(self.height / self.num_regions)

    @property
    def rw(self) -> int:
        return math.ceil(self.width / self.num_regions)

    @property
    def padded_hw(self) -> Tuple[int, int]:
        return self.rh * self.num_regions, self.rw * self.num_regions

    @property
    def region_size(self) -> int:
        """Tokens per region, padded cells included."""
        return self.rh * self.rw

    @property
    def num_region_total(self) -> int:
        return self.num_regions * self.num_regions

    @property
    def num_pad(self) -> int:
        hp, wp = self.padded_hw
        return hp * wp - self.height * self.width


def make_region_grid(spatial_shape, num_regions: int) -> RegionGrid:
    """Validate and build a :class:`RegionGrid`; ``ValueError`` when the regions do not fit the grid."""
    if len(tuple(spatial_shape)) != 2:
        raise ValueError(f"spatial_shape must be (H, W), got {tuple(spatial_shape)}")
    h, w = (int(s) for s in spatial_shape)
    if h < 1 or w < 1:
        raise ValueError(f"spatial_shape must be positive, got {(h, w)}")
    if not isinstance(num_regions, int) or num_regions < 1:
        raise ValueError(f"num_regions must be a positive int, got {num_regions!r}")
    g = RegionGrid(h, w, num_regions)
    if num_regions > min(h, w) or (num_regions - 1) * g.rh >= h or (num_regions - 1) * g.rw >= w:
        raise ValueError(
            f"num_regions={num_regions} does not fit a {h}x{w} grid: regions of {g.rh}x{g.rw} cells would leave "
            f"whole regions made only of padding; use num_regions <= {_max_regions(h, w)} for this grid")
    return g


def _max_regions(h: int, w: int) -> int:
    best = 1
    for s in range(1, min(h, w) + 1):
        if (s - 1) * math.ceil(h / s) < h and (s - 1) * math.ceil(w / s) < w:
            best = s
    return best


def regions_fit(spatial_shape, num_regions: int) -> bool:
    """True when :func:`make_region_grid` accepts the pair."""
    try:
        make_region_grid(spatial_shape, num_regions)
    except ValueError:
        return False
    return True


def check_topk(topk: int, grid: RegionGrid) -> None:
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if topk > grid.num_region_total:
        raise ValueError(f"topk={topk} exceeds the number of regions num_regions^2="
                         f"{grid.num_region_total} (num_regions={grid.num_regions})")


# ---------------------------------------------------------------------------------------------- routing
def _padded_grid_tokens(x: torch.Tensor, grid: RegionGrid, spatial_start: int) -> torch.Tensor:
    """The grid tokens of ``x (B, H, N, D)`` as ``(B, H, hp, wp, D)``, zero-padded to whole regions."""
    B, Hh, _, D = x.shape
    xs = x[:, :, spatial_start:spatial_start + grid.height * grid.width].reshape(B, Hh, grid.height, grid.width, D)
    hp, wp = grid.padded_hw
    if (hp, wp) != (grid.height, grid.width):
        xs = torch.nn.functional.pad(xs, (0, 0, 0, wp - grid.width, 0, hp - grid.height))
    return xs


def region_means(x: torch.Tensor, grid: RegionGrid, spatial_start: int, *, mask_padding: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    """Per-region mean of the grid tokens of ``x (B, H, N, D)`` -> ``(B, H, S*S, D)`` in ``dtype``.

    Padded cells count as zeros in the mean (legacy) unless ``mask_padding`` (mean over real cells).
    """
    B, Hh, _, D = x.shape
    g, S = grid, grid.num_regions
    xs = _padded_grid_tokens(x, grid, spatial_start)
    sums = xs.reshape(B, Hh, S, g.rh, S, g.rw, D).sum(dim=(3, 5), dtype=dtype)  # (B, H, S, S, D)
    if mask_padding and g.num_pad:
        cnt = region_valid_counts(g, x.device).to(dtype)
        return (sums.reshape(B, Hh, S * S, D) / cnt.view(1, 1, -1, 1))
    return sums.reshape(B, Hh, S * S, D) / g.region_size


@lru_cache(maxsize=64)
@plain_tensors
def _valid_counts_cpu(h: int, w: int, s: int) -> torch.Tensor:
    g = RegionGrid(h, w, s)
    ys = torch.arange(g.padded_hw[0]) < h
    xs = torch.arange(g.padded_hw[1]) < w
    valid = (ys[:, None] & xs[None, :]).reshape(s, g.rh, s, g.rw)
    return valid.sum(dim=(1, 3)).reshape(-1)


_VALID_DEV_CACHE: dict = {}


def region_valid_counts(grid: RegionGrid, device) -> torch.Tensor:
    """Number of real (non-padding) cells in each region, (S*S,) int64 (cached per device: no per-call copy)."""
    key = (grid.height, grid.width, grid.num_regions, str(torch.device(device)))
    t = _VALID_DEV_CACHE.get(key)
    if t is None:
        with torch.inference_mode(False):  # cached: plain tensors (see _cache.py)
            t = _VALID_DEV_CACHE[key] = _valid_counts_cpu(grid.height, grid.width, grid.num_regions).to(device)
        if len(_VALID_DEV_CACHE) > 64:
            _VALID_DEV_CACHE.pop(next(iter(_VALID_DEV_CACHE)))
    return t


def region_sums(x: torch.Tensor, grid: RegionGrid, spatial_start: int, *, dtype: torch.dtype) -> torch.Tensor:
    """Per-region sums of the grid tokens of ``x (B, H, N, D)`` over all heads' channels: ``(B, S*S, H*D)``.

    Reduced straight into the region-major layout (no transpose copy); padding cells count as zeros.
    """
    B, Hh, _, D = x.shape
    g, S = grid, grid.num_regions
    xs = _padded_grid_tokens(x, grid, spatial_start)
    sums = xs.reshape(B, Hh, S, g.rh, S, g.rw, D).permute(0, 2, 4, 1, 3, 5, 6).sum(dim=(4, 5), dtype=dtype)
    return sums.reshape(B, S * S, Hh * D)  # (B, S, S, H, D) is contiguous: a view


_ZERO_CACHE: dict = {}


def _zero(device, dtype) -> torch.Tensor:
    key = (str(device), dtype)
    z = _ZERO_CACHE.get(key)
    if z is None:
        with torch.inference_mode(False):
            z = _ZERO_CACHE[key] = torch.zeros((), device=device, dtype=dtype)
    return z


def region_affinity(q: torch.Tensor, k: torch.Tensor, grid: RegionGrid, scale: float, *, spatial_start: int = 0,
                    mask_padding: bool = False) -> torch.Tensor:
    """Region affinity ``(q_r * scale) @ k_r^T`` ``(B, S*S, S*S)`` of the region means over all heads' channels
    (heads concatenated, as in the released ``q.mean([2, 3])`` on ``qk_dim`` channels), no gradient.

    In fp32 (fp64 for fp64 inputs). Computed as ``(sum_q @ sum_k^T) * scale / r**2`` in one batched matmul
    (the same value up to rounding); with ``mask_padding`` the means divide by each region's real cells.
    Padded cells count as zeros in the sums. Both routing implementations call this, so they see the same
    values. GQA: each query head sees its key head's descriptor.
    """
    with torch.no_grad():
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        qs = region_sums(q, grid, spatial_start, dtype=cd)
        ks = region_sums(k, grid, spatial_start, dtype=cd)
        if k.shape[1] != q.shape[1]:
            B, R, _ = ks.shape
            hk, g = k.shape[1], q.shape[1] // k.shape[1]
            ks = ks.view(B, R, hk, 1, -1).expand(B, R, hk, g, ks.shape[-1] // hk).reshape(B, R, -1)
        alpha = scale / grid.region_size ** 2
        if mask_padding and grid.num_pad:
            cnt = region_valid_counts(grid, q.device).to(cd).view(1, -1, 1)
            qs, ks, alpha = qs / cnt, ks / cnt, scale
        return torch.baddbmm(_zero(q.device, cd), qs, ks.transpose(-1, -2), beta=0, alpha=alpha)


def compute_routing(q: torch.Tensor, k: torch.Tensor, grid: RegionGrid, topk: int, *, scale: float,
                    spatial_start: int = 0, mask_padding: bool = False) -> torch.Tensor:
    """Top-k key regions per query region, shared by all heads: ``(B, S*S, topk)`` int64, best first.

    Affinity from :func:`region_affinity`. Ties are broken towards the lower region index (stable descending
    sort), so the result is deterministic. No gradient, no host synchronisation. The result is a view
    (``[..., :topk]`` of the sorted indices); call ``.contiguous()`` where a compact tensor is needed.
    """
    aff = region_affinity(q, k, grid, scale, spatial_start=spatial_start, mask_padding=mask_padding)
    return torch.sort(aff, dim=-1, descending=True, stable=True).indices[..., :topk]


def check_routing(routing: torch.Tensor, batch: int, grid: RegionGrid) -> torch.Tensor:
    """Validate user-given routing indices (B|1, S*S, topk) and return them as int64 on their device."""
    R = grid.num_region_total
    if routing.dim() != 3 or routing.shape[0] not in (1, batch) or routing.shape[1] != R:
        raise ValueError(f"routing must have shape (B|1, num_regions^2={R}, topk), got {tuple(routing.shape)}")
    routing = routing.long()
    if routing.numel():
        lo, hi = torch.stack([routing.min(), routing.max()]).tolist()  # one host sync (user-given indices)
        if lo < 0 or hi >= R:
            raise ValueError(f"routing indices must lie in [0, {R})")
    return routing.expand(batch, -1, -1)


# ---------------------------------------------------------------------------------------------- token orders
@dataclass(frozen=True)
class TokenOrder:
    """Kernel order for one (grid, regions, extras) combination (see the module docstring)."""

    perm: torch.Tensor          # (Nw,) int64: kernel position -> working index
    group_k: torch.Tensor       # (Nw,) int64: group of each kernel position (region id, or R for extras)
    group_w: torch.Tensor       # (Nw,) int64: group of each working index
    pad_w: torch.Tensor         # (Nw,) bool: working index is a padding cell
    num_tokens: int             # N (original)
    num_work: int               # N + P
    num_grid: int               # padded grid tokens (S*S regions of rh*rw)
    inv: torch.Tensor           # (Nw,) int64: argsort(perm), the output un-permutation
    key: tuple = ()             # (height, width, num_regions, spatial_start, seq_len)


@lru_cache(maxsize=64)
@plain_tensors
def _token_order_cpu(h: int, w: int, s: int, spatial_start: int, seq_len: int) -> TokenOrder:
    g = RegionGrid(h, w, s)
    hp, wp = g.padded_hw
    n, p = seq_len, g.num_pad
    ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    real = (ys < h) & (xs < w)
    work = torch.empty(hp, wp, dtype=torch.long)
    work[real] = spatial_start + (ys * w + xs)[real]
    work[~real] = n + torch.arange(p)  # padding cells, row-major over the padded grid
    region = (ys // g.rh) * s + (xs // g.rw)
    # region-major: (region row, region col, row in region, col in region)
    perm_grid = work.reshape(s, g.rh, s, g.rw).permute(0, 2, 1, 3).reshape(-1)
    grp_grid = region.reshape(s, g.rh, s, g.rw).permute(0, 2, 1, 3).reshape(-1)
    extras = torch.cat([torch.arange(spatial_start), torch.arange(spatial_start + h * w, n)])
    R = s * s
    perm = torch.cat([perm_grid, extras])
    group_k = torch.cat([grp_grid, torch.full((extras.numel(),), R, dtype=torch.long)])
    group_w = torch.empty_like(group_k)
    group_w[perm] = group_k
    pad_w = torch.zeros(n + p, dtype=torch.bool)
    pad_w[n:] = True
    return TokenOrder(perm, group_k, group_w, pad_w, n, n + p, hp * wp, torch.argsort(perm),
                      (h, w, s, spatial_start, seq_len))


_ORDER_DEV_CACHE: dict = {}


def token_order(grid: RegionGrid, spatial_start: int, seq_len: int, device) -> TokenOrder:
    """Cached :class:`TokenOrder` on ``device``."""
    key = (grid.height, grid.width, grid.num_regions, spatial_start, seq_len, str(torch.device(device)))
    if key not in _ORDER_DEV_CACHE:
        o = _token_order_cpu(grid.height, grid.width, grid.num_regions, spatial_start, seq_len)
        with torch.inference_mode(False):
            _ORDER_DEV_CACHE[key] = TokenOrder(*(t.to(device) for t in (o.perm, o.group_k, o.group_w, o.pad_w)),
                                               o.num_tokens, o.num_work, o.num_grid, o.inv.to(device), o.key)
        if len(_ORDER_DEV_CACHE) > 64:
            _ORDER_DEV_CACHE.pop(next(iter(_ORDER_DEV_CACHE)))
    return _ORDER_DEV_CACHE[key]


def group_allow(routing: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Bool (B, R+1, R+1): ``[b, a, c]`` = query group a may attend key group c (group R = extra tokens)."""
    B, R, _ = routing.shape
    allow = torch.zeros(B, R + 1, R + 1, dtype=torch.bool, device=routing.device)
    allow[:, :R].scatter_(-1, routing, True)
    allow[:, :, R] = True   # every query sees the extra tokens
    allow[:, R, :] = True   # extra tokens are global queries
    return allow


# ---------------------------------------------------------------------------------------------- strategy
#: small-problem fallback (CUDA): masked dense SDPA when ``batch * heads * Nw**2`` (dense score count) is at most
#: this. Below it the gather-free path's fixed per-call cost (routing, layout, permutation copies, Triton launch)
#: exceeds the whole dense attention; see docs/methods/routing.md for the measurement.
DENSE_SCORES_THRESHOLD = 1 << 28
#: ... and only while the dense path's (B, 1, Nw, Nw) additive mask has at most this many elements (memory cap)
DENSE_MASK_MAX_ELEMS = 1 << 26


def choose_strategy(grid: RegionGrid, num_work: int, strategy: str = "auto",
                    block_size: Optional[int] = None, *, batch_heads: Optional[int] = None,
                    dense_threshold: Optional[int] = None, batch: int = 1) -> Tuple[str, int]:
    """Pick ``("aligned" | "packed" | "dense", block)`` for this grid.

    * aligned: the region size is a multiple of MIN_TILE; block = the largest power of two <= MAX_TILE that
      divides it, so every routed (query region, key region) pair is a set of FULL blocks.
    * packed: smaller or odd regions share blocks (several regions per program); blocks that mix routed
      and unrouted regions are PARTIAL with an element mask.
    * dense: masked dense SDPA with the equivalent boolean mask (regions below MIN_TILE, <= DENSE_MAX_TOKENS;
      or, with ``batch_heads`` and ``dense_threshold`` given, ``batch_heads * num_work**2 <= dense_threshold``
      and ``batch * num_work**2 <= DENSE_MASK_MAX_ELEMS``: the small-problem fallback).
    """
    return _choose(grid, num_work, strategy, block_size, batch_heads, dense_threshold, batch)[:2]


def _choose(grid: RegionGrid, num_work: int, strategy: str, block_size: Optional[int],
            batch_heads: Optional[int], dense_threshold: Optional[int], batch: int = 1) -> Tuple[str, int, str]:
    r = grid.region_size
    if strategy not in ("auto", "aligned", "packed", "dense"):
        raise ValueError(f"strategy must be 'auto', 'aligned', 'packed' or 'dense', got {strategy!r}")
    aligned_block = 0
    b = MAX_TILE
    while b >= MIN_TILE:
        if r % b == 0:
            aligned_block = b
            break
        b //= 2
    reason = ""
    if strategy == "auto":
        if (batch_heads and dense_threshold and batch_heads * num_work * num_work <= dense_threshold
                and batch * num_work * num_work <= DENSE_MASK_MAX_ELEMS):
            strategy, reason = "dense", "small"
        elif aligned_block:
            strategy = "aligned"
        elif r < MIN_TILE and num_work <= DENSE_MAX_TOKENS:
            strategy, reason = "dense", "tiny regions"
        else:
            strategy = "packed"
    if strategy == "aligned":
        if block_size is None:
            if not aligned_block:
                raise ValueError(f"strategy='aligned' needs a region size that is a multiple of {MIN_TILE}; "
                                 f"regions here hold {grid.rh}x{grid.rw}={r} tokens")
            block_size = aligned_block
        return "aligned", block_size, reason
    if strategy == "packed":
        if block_size is None:
            block_size = max(MIN_TILE, min(MAX_TILE, 1 << max(0, (r - 1).bit_length())))
        return "packed", block_size, reason
    return "dense", 0, reason


_LOGGED: set = set()


def log_strategy(grid: RegionGrid, strategy: str, block: int, num_work: int, reason: str = "",
                 scores: Optional[int] = None, threshold: Optional[int] = None) -> None:
    """Log the path choice: INFO the first time per (grid, regions, choice), DEBUG afterwards."""
    key = (grid.height, grid.width, grid.num_regions, strategy, block, reason)
    seen = key in _LOGGED
    if seen and not logger.isEnabledFor(logging.DEBUG):
        return
    msg = (f"bilevel routing: grid {grid.height}x{grid.width}, {grid.num_regions}x{grid.num_regions} regions of "
           f"{grid.rh}x{grid.rw}={grid.region_size} tokens, {num_work} tokens -> {strategy}"
           + (f" (block {block})" if block else " (masked dense SDPA)"))
    if reason == "small":
        msg += (f": small problem, batch*heads*tokens^2 = {scores} <= dense_threshold {threshold} "
                f"(pass dense_threshold=0 or a strategy to override)")
    if seen:
        logger.debug(msg)
    else:
        _LOGGED.add(key)
        logger.info(msg)


# ---------------------------------------------------------------------------------------------- layout
def build_layout(routing: torch.Tensor, order: TokenOrder, num_groups: int, block: int, *,
                 mask_padding: bool, with_perm: bool = True) -> BlockLayout:
    """Region-major BlockLayout (batch dim B, head dim 1) for routing ``(B, R, topk)``.

    Aligned blocks (the block divides the region size): built directly from the routing with no host
    synchronisation (``_routing_layout.direct_layout``). Packed blocks: classified FULL / PARTIAL / EMPTY from
    per-block group counts, lists built with one host sync (``_routing_layout.packed_layout``).
    ``with_perm``: attach ``perm_q = perm_k = order.perm`` and an original-position ``mask_mod`` (the layout then
    takes q/k/v in original order through the dispatcher); without it the layout is in kernel order.
    """
    from . import _routing_layout as rl
    h, w, s, start, n = order.key
    plan = rl.get_plan(RegionGrid(h, w, s), start, n, block, mask_padding=mask_padding, device=routing.device)
    layout = rl.direct_layout(plan, routing) if plan.aligned else rl.packed_layout(plan, routing)
    return rl.with_permutation(layout, plan, routing) if with_perm else layout


def dense_mask(routing: torch.Tensor, order: TokenOrder, num_groups: int, *, mask_padding: bool) -> torch.Tensor:
    """Element mask (B, 1, Nw, Nw) in working order (tests and references)."""
    allow = group_allow(routing, num_groups)
    g = order.group_w
    m = allow[:, g][:, :, g]
    if mask_padding:
        m = m & ~order.pad_w.view(1, 1, -1)
    return m.unsqueeze(1)


def dense_bias(routing: torch.Tensor, order: TokenOrder, grid: RegionGrid, *, mask_padding: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, Nw, Nw) in ``dtype`` (0 kept, -inf masked) in working order: the dense path's
    ``attn_mask``, equal to :func:`dense_mask`. Built at region level and expanded (a divisible grid with no
    extra tokens: one broadcast copy; otherwise two gathers), with no boolean-to-float conversion inside SDPA."""
    B = routing.shape[0]
    R, S, rh, rw = grid.num_region_total, grid.num_regions, grid.rh, grid.rw
    nw = order.num_work
    if order.num_grid == nw and grid.num_pad == 0:
        bias = torch.full((B, R, R), float("-inf"), dtype=dtype, device=routing.device)
        bias.scatter_(-1, routing, 0.0)
        return (bias.view(B, S, 1, S, 1, S, 1, S, 1).expand(B, S, rh, S, rw, S, rh, S, rw)
                .reshape(B, 1, nw, nw))
    bias = torch.full((B, R + 1, R + 1), float("-inf"), dtype=dtype, device=routing.device)
    bias[:, :R].scatter_(-1, routing, 0.0)
    bias[:, :, R] = 0.0   # every query sees the extra tokens
    bias[:, R, :] = 0.0   # extra tokens are global queries
    g = order.group_w
    m = bias[:, g][:, :, g]
    if mask_padding and grid.num_pad:
        m.masked_fill_(order.pad_w.view(1, 1, -1), float("-inf"))
    return m.unsqueeze(1)
