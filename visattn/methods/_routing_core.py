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

from ..kernels.layout import BlockLayout, block_lists

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
def region_means(x: torch.Tensor, grid: RegionGrid, spatial_start: int, *, mask_padding: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    """Per-region mean of the grid tokens of ``x (B, H, N, D)`` -> ``(B, H, S*S, D)`` in ``dtype``.

    Padded cells count as zeros in the mean (legacy) unless ``mask_padding`` (mean over real cells).
    """
    B, Hh, _, D = x.shape
    g, S = grid, grid.num_regions
    xs = x[:, :, spatial_start:spatial_start + g.height * g.width].reshape(B, Hh, g.height, g.width, D)
    hp, wp = g.padded_hw
    if (hp, wp) != (g.height, g.width):
        xs = torch.nn.functional.pad(xs, (0, 0, 0, wp - g.width, 0, hp - g.height))
    sums = xs.reshape(B, Hh, S, g.rh, S, g.rw, D).sum(dim=(3, 5), dtype=dtype)  # (B, H, S, S, D)
    if mask_padding and g.num_pad:
        cnt = region_valid_counts(g, x.device).to(dtype)
        return (sums.reshape(B, Hh, S * S, D) / cnt.view(1, 1, -1, 1))
    return sums.reshape(B, Hh, S * S, D) / g.region_size


@lru_cache(maxsize=64)
def _valid_counts_cpu(h: int, w: int, s: int) -> torch.Tensor:
    g = RegionGrid(h, w, s)
    ys = torch.arange(g.padded_hw[0]) < h
    xs = torch.arange(g.padded_hw[1]) < w
    valid = (ys[:, None] & xs[None, :]).reshape(s, g.rh, s, g.rw)
    return valid.sum(dim=(1, 3)).reshape(-1)


def region_valid_counts(grid: RegionGrid, device) -> torch.Tensor:
    """Number of real (non-padding) cells in each region, (S*S,) int64."""
    return _valid_counts_cpu(grid.height, grid.width, grid.num_regions).to(device)


def compute_routing(q: torch.Tensor, k: torch.Tensor, grid: RegionGrid, topk: int, *, scale: float,
                    spatial_start: int = 0, mask_padding: bool = False) -> torch.Tensor:
    """Top-k key regions per query region, shared by all heads: ``(B, S*S, topk)`` int64, best first.

    Region descriptors are the per-region means of q and k over all heads' channels (heads concatenated,
    as in the released ``q.mean([2, 3])`` on ``qk_dim`` channels); affinity ``(q_r * scale) @ k_r^T``.
    Ties are broken towards the lower region index (stable descending sort), so the result is
    deterministic. Computed without gradient, in float64 for float64 inputs and float32 otherwise.
    """
    with torch.no_grad():
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        qr = region_means(q, grid, spatial_start, mask_padding=mask_padding, dtype=cd)
        kr = region_means(k, grid, spatial_start, mask_padding=mask_padding, dtype=cd)
        if kr.shape[1] != qr.shape[1]:  # GQA: each query head sees its key head's descriptor
            kr = kr.repeat_interleave(qr.shape[1] // kr.shape[1], dim=1)
        B, Hh, R, D = qr.shape
        qr = qr.permute(0, 2, 1, 3).reshape(B, R, Hh * D)
        kr = kr.permute(0, 2, 1, 3).reshape(B, R, Hh * D)
        aff = torch.matmul(qr * scale, kr.transpose(-1, -2))  # (B, R, R)
        order = torch.sort(aff, dim=-1, descending=True, stable=True).indices
        return order[..., :topk].contiguous()


def check_routing(routing: torch.Tensor, batch: int, grid: RegionGrid) -> torch.Tensor:
    """Validate user-given routing indices (B|1, S*S, topk) and return them as int64 on their device."""
    R = grid.num_region_total
    if routing.dim() != 3 or routing.shape[0] not in (1, batch) or routing.shape[1] != R:
        raise ValueError(f"routing must have shape (B|1, num_regions^2={R}, topk), got {tuple(routing.shape)}")
    routing = routing.long()
    if routing.numel() and (int(routing.min()) < 0 or int(routing.max()) >= R):
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


@lru_cache(maxsize=64)
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
    return TokenOrder(perm, group_k, group_w, pad_w, n, n + p, hp * wp, torch.argsort(perm))


_ORDER_DEV_CACHE: dict = {}


def token_order(grid: RegionGrid, spatial_start: int, seq_len: int, device) -> TokenOrder:
    """Cached :class:`TokenOrder` on ``device``."""
    key = (grid.height, grid.width, grid.num_regions, spatial_start, seq_len, str(torch.device(device)))
    if key not in _ORDER_DEV_CACHE:
        o = _token_order_cpu(grid.height, grid.width, grid.num_regions, spatial_start, seq_len)
        _ORDER_DEV_CACHE[key] = TokenOrder(*(t.to(device) for t in (o.perm, o.group_k, o.group_w, o.pad_w)),
                                           o.num_tokens, o.num_work, o.num_grid, o.inv.to(device))
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
def choose_strategy(grid: RegionGrid, num_work: int, strategy: str = "auto",
                    block_size: Optional[int] = None) -> Tuple[str, int]:
    """Pick ``("aligned" | "packed" | "dense", block)`` for this grid.

    * aligned: the region size is a multiple of MIN_TILE; block = the largest power of two <= MAX_TILE that
      divides it, so every routed (query region, key region) pair is a set of FULL blocks.
    * packed: smaller or odd regions share blocks (several regions per program); blocks that mix routed
      and unrouted regions are PARTIAL with an element mask.
    * dense: masked dense SDPA with the equivalent boolean mask (regions below MIN_TILE, <= DENSE_MAX_TOKENS).
    """
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
    if strategy == "auto":
        if aligned_block:
            strategy = "aligned"
        elif r < MIN_TILE and num_work <= DENSE_MAX_TOKENS:
            strategy = "dense"
        else:
            strategy = "packed"
    if strategy == "aligned":
        if block_size is None:
            if not aligned_block:
                raise ValueError(f"strategy='aligned' needs a region size that is a multiple of {MIN_TILE}; "
                                 f"regions here hold {grid.rh}x{grid.rw}={r} tokens")
            block_size = aligned_block
        return "aligned", block_size
    if strategy == "packed":
        if block_size is None:
            block_size = max(MIN_TILE, min(MAX_TILE, 1 << max(0, (r - 1).bit_length())))
        return "packed", block_size
    return "dense", 0


_LOGGED: set = set()


def log_strategy(grid: RegionGrid, strategy: str, block: int, num_work: int) -> None:
    """Log the path choice: INFO the first time per (grid, regions, choice), DEBUG afterwards."""
    key = (grid.height, grid.width, grid.num_regions, strategy, block)
    msg = (f"bilevel routing: grid {grid.height}x{grid.width}, {grid.num_regions}x{grid.num_regions} regions of "
           f"{grid.rh}x{grid.rw}={grid.region_size} tokens, {num_work} tokens -> {strategy}"
           + (f" (block {block})" if block else " (masked dense SDPA)"))
    if key in _LOGGED:
        logger.debug(msg)
    else:
        _LOGGED.add(key)
        logger.info(msg)


# ---------------------------------------------------------------------------------------------- layout
def build_layout(routing: torch.Tensor, order: TokenOrder, num_groups: int, block: int, *,
                 mask_padding: bool) -> BlockLayout:
    """Region-major BlockLayout (batch dim B, head dim 1) for routing ``(B, R, topk)``.

    Blocks are classified from per-block group counts: kept(qb, kb) = sum_a,c cq[qb,a] allow[a,c] ck[kb,c];
    FULL when every element is kept, EMPTY when none is, PARTIAL otherwise (element mask from ``mask_mod``).
    When the block divides the region size, no extra tokens exist and no padding is masked, the lists are
    built directly (no host synchronisation): query block i of region a visits the blocks of a's routed regions.
    """
    dev = routing.device
    B = routing.shape[0]
    r = order.num_grid // num_groups
    if (order.num_grid == order.num_work and r % block == 0
            and not (mask_padding and order.num_work > order.num_tokens)):
        return _aligned_layout(routing, order, r // block, block)
    G = num_groups + 1
    nw = order.num_work
    nb = math.ceil(nw / block)
    allow = group_allow(routing, num_groups)
    pos = torch.arange(nw, device=dev)
    blk = pos // block
    cq = torch.zeros(nb, G, device=dev, dtype=torch.float32)
    cq.index_put_((blk, order.group_k), torch.ones(nw, device=dev), accumulate=True)
    kvalid = torch.ones(nw, dtype=torch.bool, device=dev)
    if mask_padding:
        kvalid = ~order.pad_w[order.perm]
    ck = torch.zeros(nb, G, device=dev, dtype=torch.float32)
    ck.index_put_((blk, order.group_k), kvalid.float(), accumulate=True)
    kept = torch.matmul(torch.matmul(cq, allow.float()), ck.t())  # (B, nb, nb); exact integers in fp32
    rows = cq.sum(-1)  # query positions per block (the last block may be short)
    total = rows.view(nb, 1) * block
    full = kept == total
    full &= (torch.arange(nb, device=dev) * block + block <= nw).view(1, 1, nb)  # ragged last key block
    partial = (kept > 0) & ~full
    full, partial = full.unsqueeze(1), partial.unsqueeze(1)  # (B, 1, nb, nb)
    f_idx, f_cnt = block_lists(full)
    p_idx, p_cnt = block_lists(partial)
    mask_mod = None
    has_partial = bool(p_cnt.any())
    if has_partial:
        group_w, pad_w = order.group_w, order.pad_w

        def mask_mod(b, h, qi, ki):  # original (working) positions
            keep = allow[b, group_w[qi], group_w[ki]]
            return keep & ~pad_w[ki] if mask_padding else keep
    layout = BlockLayout.from_indices(f_idx, f_cnt, block_size=block, seq_lens=nw,
                                      partial_indices=p_idx if has_partial else None,
                                      partial_counts=p_cnt if has_partial else None, mask_mod=mask_mod,
                                      perm_q=order.perm, perm_k=order.perm)
    layout._cache["inv_q"] = order.inv
    return layout


def _aligned_layout(routing: torch.Tensor, order: TokenOrder, bpr: int, block: int) -> BlockLayout:
    """All-FULL layout: region a (blocks a*bpr .. a*bpr+bpr-1) visits the blocks of its routed regions."""
    dev = routing.device
    B, R, topk = routing.shape
    ar = torch.arange(bpr, device=dev)
    kb = (routing.sort(-1).values.unsqueeze(-1) * bpr + ar).reshape(B, R, topk * bpr)  # sorted ascending
    f_idx = kb.repeat_interleave(bpr, dim=1).unsqueeze(1).to(torch.int32).contiguous()  # (B, 1, R*bpr, topk*bpr)
    f_cnt = torch.full((B, 1, R * bpr), topk * bpr, dtype=torch.int32, device=dev)
    zeros = torch.zeros(B, 1, R * bpr, 1, dtype=torch.int32, device=dev)
    table = torch.zeros(1, block, (block + 31) // 32, dtype=torch.int32, device=dev)
    nw = order.num_work
    layout = BlockLayout(nw, nw, block, block, f_cnt, f_idx, torch.zeros(B, 1, R * bpr, dtype=torch.int32, device=dev),
                         zeros, zeros.clone(), table, order.perm, order.perm, None)
    layout._cache["inv_q"] = order.inv  # the dispatcher's un-permutation, precomputed once per grid
    return layout


def dense_mask(routing: torch.Tensor, order: TokenOrder, num_groups: int, *, mask_padding: bool) -> torch.Tensor:
    """Element mask (B, 1, Nw, Nw) in working order (the dense fallback and tests)."""
    allow = group_allow(routing, num_groups)
    g = order.group_w
    m = allow[:, g][:, :, g]
    if mask_padding:
        m = m & ~order.pad_w.view(1, 1, -1)
    return m.unsqueeze(1)
