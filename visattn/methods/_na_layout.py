"""Block-sparse layouts for neighborhood attention: tiled token permutation + analytic block classes.

Kernel order (``perm[i]`` = original position held by kernel position ``i``):

1. grid tokens lying in a *complete* tile of their dilation group's local grid, ordered by
   (dilation group, tile, sub-tile inside the tile, row-major position inside the sub-tile); a tile is
   ``max(block_m, block_n)`` tokens and a sub-tile ``min(block_m, block_n)``, so the larger blocks
   coincide with tiles and the smaller ones with sub-tiles, all compact boxes (:func:`choose_tiles`);
2. the remaining border tokens of ragged tiles, ordered the same way;
3. global (prefix/suffix) tokens.

Blocks are classified per (query block, key block) from per-block bounding boxes: a key block inside the
intersection of all of the query block's windows is FULL; one that touches their union is visited. For
box-shaped blocks this is exact; pairs involving non-box blocks (ragged borders, mixed groups, global
tokens) are settled by evaluating the element predicate on just those pairs. No N x N tensor is built.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch

from ..kernels.layout import BlockLayout, block_lists, factor_masks
from ._na_mask import NASpec, axis_windows, make_mask_mod
from ._na_table import build_mask_table

__all__ = ["choose_tile", "choose_tiles", "token_permutation", "classify_blocks", "get_layout", "block_counts",
           "default_block_size", "auto_block_size", "tile_candidates"]

_BIG = 1 << 40
_PARTIAL_COST = 1.6  # a partial block costs about this many full blocks (predicate + mask loads)


def default_block_size(device: torch.device, head_dim: int) -> Tuple[int, int]:
    """Query/key block sizes without looking at the problem: 128x128 on CUDA for D <= 128 (the Triton
    kernel's 128x128 step), 128x64 for larger D; 32x32 elsewhere (CPU reference path and tests).
    :func:`auto_block_size` refines the CUDA choice per problem."""
    if torch.device(device).type == "cuda":
        return (128, 128) if head_dim <= 128 else (128, 64)
    return (32, 32)


def auto_block_size(spec: NASpec, device, head_dim: int) -> Tuple[int, int]:
    """The block sizes ``neighborhood_attention`` uses when none are given.

    On CUDA with 64 < D <= 128 the Triton forward runs 128x64 steps either way, so a 128x64 layout costs
    the same per visited 64-key half block as a 128x128 one but can skip the empty halves and turn
    partial halves into full ones: the block size with the lower estimated cost (:func:`choose_tiles`,
    in 128x64 step units) wins, ties keep 128x128. Elsewhere :func:`default_block_size`.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not 64 < head_dim <= 128:
        return default_block_size(dev, head_dim)
    return _auto_cuda_blocks(spec)


@lru_cache(maxsize=256)
def _auto_cuda_blocks(spec: NASpec) -> Tuple[int, int]:
    best, best_cost = None, None
    for bs in ((128, 128), (128, 64)):
        cost = _choose(spec, bs)[2] * bs[0] * bs[1]
        if best_cost is None or cost < best_cost * (1 - 1e-6):
            best, best_cost = bs, cost
    return best


def _factorizations(n: int, parts: int):
    if parts == 1:
        yield (n,)
        return
    for f in range(1, n + 1):
        if n % f == 0:
            for rest in _factorizations(n // f, parts - 1):
                yield (f,) + rest


def _axis_counts(spec: NASpec, axis: int, tq: int, tk: int, tile: int) -> Tuple[float, float, float]:
    """Along one axis, summed over dilation groups: (visited, full) key runs of ``tk`` per query run of
    ``tq`` (window union / intersection of the run's queries), and the tokens in complete ``tile`` runs."""
    L, k, d, s, c = (spec.shape[axis], spec.kernel[axis], spec.dilation[axis], spec.stride[axis],
                     spec.causal[axis])
    _, _, lo_all, hi_all = axis_windows(L, k, d, s, c)
    vis = full = inside = 0.0
    for g, lg in enumerate(spec.group_extents(axis)):
        lo, hi = lo_all[g::d], hi_all[g::d]  # group-local order
        starts = torch.arange(0, lg, tq)
        ends = (starts + tq).clamp_max(lg) - 1
        umin, umax, ilo, ihi = lo[starts], hi[ends], lo[ends], hi[starts]
        vis += float((umax // tk - umin // tk + 1).sum())
        full += float(((ihi + 1) // tk - (ilo + tk - 1) // tk).clamp_min(0).sum())
        inside += (lg // tile) * tile
    return vis, full, inside


def tile_candidates(spec: NASpec, block_size: Tuple[int, int]) -> list:
    """Every ``(estimated cost, tile, sub_tile)`` :func:`choose_tiles` considers for ``block_size``."""
    bm, bn = block_size
    big, small = max(bm, bn), min(bm, bn)
    nested = big % small == 0
    outer = big if nested else math.lcm(bm, bn)
    maxlg = [max(spec.group_extents(a)) for a in range(spec.ndim)]
    if math.prod(maxlg) <= outer:
        return [(0.0, tuple(maxlg), tuple(maxlg))]
    out = []
    cache: Dict[Tuple[int, int, int, int], Tuple[float, float, float]] = {}
    for tile in _factorizations(outer, spec.ndim):
        if any(t > m for t, m in zip(tile, maxlg)):
            continue
        subs = ([s for s in _factorizations(small, spec.ndim) if all(t % x == 0 for t, x in zip(tile, s))]
                if nested else [tile])
        for sub in subs:
            tq, tk = (tile, sub) if bm >= bn else (sub, tile)
            parts = [cache.setdefault((a, tq[a], tk[a], tile[a]), _axis_counts(spec, a, tq[a], tk[a], tile[a]))
                     for a in range(spec.ndim)]
            vis = math.prod(p[0] for p in parts)
            full = math.prod(p[1] for p in parts)
            leftover = 1.0 - math.prod(p[2] for p in parts) / spec.num_spatial
            out.append(((full + _PARTIAL_COST * (vis - full)) * (1.0 + 0.5 * leftover), tile, sub))
    if not out:  # some axis shorter than any factor: fall back to the whole grid per axis
        return [(0.0, tuple(maxlg), tuple(maxlg))]
    return out


def _choose(spec: NASpec, block_size: Tuple[int, int]):
    """``(tile, sub_tile, cost)`` for ``block_size = (bm, bn)``; see :func:`choose_tiles`."""
    best, best_cost = None, None
    for cost, tile, sub in tile_candidates(spec, block_size):
        # ties: prefer longer runs along the last (contiguous) axis, for the tile, then the sub-tile
        cand = (tile[::-1], sub[::-1])
        if best_cost is None or cost < best_cost * (1 - 1e-9) or (cost <= best_cost * (1 + 1e-9)
                                                                   and cand > best[0]):
            best, best_cost = (cand, tile, sub), cost
    return best[1], best[2], best_cost


def choose_tiles(spec: NASpec, block_size: Tuple[int, int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(tile, sub_tile)`` for ``block_size = (bm, bn)``, minimising the estimated ``full + 1.6 * partial``.

    Tiles hold ``max(bm, bn)`` tokens (``lcm`` if one does not divide the other) and are split into
    sub-tiles of ``min(bm, bn)`` tokens (both boxes of the grid), so the larger blocks are tiles and the
    smaller blocks sub-tiles. E.g. 2-D NA 256x256, window 80, 128x64 blocks: query tiles 8x16 whose key
    halves are 8x8 boxes (2.9x fewer partial blocks than 4x16 halves). The estimate is separable over
    axes (exact when tiles divide every group extent); tokens left in ragged border tiles are penalised.
    Grids smaller than one tile use the whole grid as the tile.
    """
    tile, sub, _ = _choose(spec, tuple(block_size))
    return tile, sub


def choose_tile(spec: NASpec, tile_tokens: int) -> Tuple[int, ...]:
    """Tile shape (product ``tile_tokens``) for square blocks of that size (see :func:`choose_tiles`)."""
    return choose_tiles(spec, (tile_tokens, tile_tokens))[0]


def _grid_coords(spec: NASpec, device) -> list:
    idx = torch.arange(spec.num_spatial, device=device)
    out = []
    for a in range(spec.ndim):
        st = math.prod(spec.shape[a + 1:])
        out.append((idx // st) % spec.shape[a])
    return out


def token_permutation(spec: NASpec, tile: Tuple[int, ...], device=None,
                      sub_tile: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """Kernel order -> original position (int64, length ``spec.seq_len``); see the module docstring.

    Inside a tile, tokens run sub-tile by sub-tile (sub-tiles row-major within the tile, tokens row-major
    within the sub-tile); ``sub_tile=None`` (or equal to ``tile``) is plain row-major order in the tile.
    """
    sub = tuple(tile) if sub_tile is None else tuple(sub_tile)
    if any(t % x for t, x in zip(tile, sub)):
        raise ValueError(f"sub_tile {sub} must divide tile {tuple(tile)} on every axis")
    coords = _grid_coords(spec, device)
    n_groups = math.prod(spec.dilation)
    group = torch.zeros(spec.num_spatial, dtype=torch.int64, device=device)
    tile_lin = torch.zeros_like(group)
    sub_lin = torch.zeros_like(group)
    in_sub = torch.zeros_like(group)
    complete = torch.ones(spec.num_spatial, dtype=torch.bool, device=device)
    n_tiles = 1
    for a, x in enumerate(coords):
        d, t, u = spec.dilation[a], tile[a], sub[a]
        g, xl = x % d, x // d
        lg = (spec.shape[a] - g + d - 1) // d
        tiles_a = -(-max(spec.group_extents(a)) // t)
        group = group * d + g
        tile_lin = tile_lin * tiles_a + xl // t
        xt = xl % t
        sub_lin = sub_lin * (t // u) + xt // u
        in_sub = in_sub * u + xt % u
        complete &= (xl // t) < (lg // t)
        n_tiles *= tiles_a
    tsize = math.prod(tile)
    in_tile = sub_lin * math.prod(sub) + in_sub
    key = ((((~complete).long() * n_groups + group) * n_tiles + tile_lin) * tsize + in_tile)
    order = torch.argsort(key, stable=True) + spec.prefix
    glob = torch.cat([torch.arange(spec.prefix, device=device),
                      torch.arange(spec.prefix + spec.num_spatial, spec.seq_len, device=device)])
    return torch.cat([order, glob])


def _block_info(spec: NASpec, perm: torch.Tensor, bs: int, tabs) -> dict:
    """Per block of ``bs`` kernel positions: bounding boxes, window union/intersection, group, flags."""
    N, n, dev = spec.seq_len, spec.num_spatial, perm.device
    nb = -(-N // bs)
    raw = torch.arange(nb * bs, device=dev)
    valid = (raw < N).view(nb, bs)
    tok = perm[raw.clamp_max(N - 1)] - spec.prefix
    grid = (tok >= 0) & (tok < n)
    tc = tok.clamp(0, n - 1)
    gridv = grid.view(nb, bs)
    info = {"any_global": ((~gridv) & valid).any(1), "has_grid": gridv.any(1)}
    group = torch.zeros_like(tc)
    kmin, kmax, umin, umax, ilo, ihi, gax = [], [], [], [], [], [], []

    def red(x, fill, op):
        return getattr(torch.where(gridv, x.view(nb, bs), torch.full_like(x.view(nb, bs), fill)), op)(1)

    for a, (g, xl, lo, hi) in enumerate(tabs):
        st = math.prod(spec.shape[a + 1:])
        x = (tc // st) % spec.shape[a]
        group = group * spec.dilation[a] + g[x]
        c, l_, h_ = xl[x], lo[x], hi[x]
        gax.append(red(g[x], _BIG, "amin"))
        kmin.append(red(c, _BIG, "amin"))
        kmax.append(red(c, -_BIG, "amax"))
        umin.append(red(l_, _BIG, "amin"))
        umax.append(red(h_, -_BIG, "amax"))
        ilo.append(red(l_, -_BIG, "amax"))
        ihi.append(red(h_, _BIG, "amin"))
    gmin, gmax = red(group, _BIG, "amin"), red(group, -_BIG, "amax")
    vol = torch.ones(nb, dtype=torch.int64, device=dev)
    for lo_, hi_ in zip(kmin, kmax):
        vol = vol * (hi_ - lo_ + 1).clamp_min(0)
    distinct = (gridv & valid).sum(1)
    info.update(kmin=torch.stack(kmin, 1), kmax=torch.stack(kmax, 1), umin=torch.stack(umin, 1),
                umax=torch.stack(umax, 1), ilo=torch.stack(ilo, 1), ihi=torch.stack(ihi, 1), gax=torch.stack(gax, 1),
                gmin=gmin,
                gmax=gmax, single=(gmin == gmax) & info["has_grid"],
                box=(~info["any_global"]) & (gmin == gmax) & (vol == distinct) & info["has_grid"])
    return info


def classify_blocks(spec: NASpec, perm: torch.Tensor, block_size: Tuple[int, int],
                    chunk_pairs: int = 1 << 22) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense bool (nQB, nKB) FULL and PARTIAL matrices in kernel order (exact; see module docstring)."""
    return _classify(spec, perm, block_size, chunk_pairs)[:2]


def _classify(spec: NASpec, perm: torch.Tensor, block_size: Tuple[int, int], chunk_pairs: int = 1 << 22):
    """``classify_blocks`` plus the per-block infos and per-axis window tables (for the mask table)."""
    bm, bn = block_size
    dev = perm.device
    tabs = [axis_windows(L, k, d, s, c, dev)
            for L, k, d, s, c in zip(spec.shape, spec.kernel, spec.dilation, spec.stride, spec.causal)]
    qi = _block_info(spec, perm, bm, tabs)
    ki = qi if bn == bm else _block_info(spec, perm, bn, tabs)
    nqb, nkb = qi["box"].numel(), ki["box"].numel()
    full = torch.zeros(nqb, nkb, dtype=torch.bool, device=dev)
    partial = torch.zeros_like(full)
    unsure = []
    rows = max(1, chunk_pairs // max(1, nkb * spec.ndim))
    for r0 in range(0, nqb, rows):
        q = {key: v[r0:r0 + rows].unsqueeze(1) for key, v in qi.items()}
        k = {key: v.unsqueeze(0) for key, v in ki.items()}
        overlap = q["has_grid"] & k["has_grid"] & (k["gmin"] <= q["gmax"]) & (k["gmax"] >= q["gmin"])
        inside = q["single"] & k["single"] & (q["gmin"] == k["gmin"])
        for a in range(spec.ndim):
            kmn, kmx = k["kmin"][..., a], k["kmax"][..., a]
            overlap = overlap & (kmn <= q["umax"][..., a]) & (kmx >= q["umin"][..., a])
            inside = inside & (kmn >= q["ilo"][..., a]) & (kmx <= q["ihi"][..., a])
        all_glob_q, all_glob_k = ~q["has_grid"], ~k["has_grid"]
        cand = overlap | q["any_global"] | k["any_global"]
        sure_full = all_glob_q | all_glob_k | inside
        exact = q["box"] & k["box"]
        full[r0:r0 + rows] = sure_full
        partial[r0:r0 + rows] = cand & ~sure_full & exact
        unsure.append((cand & ~sure_full & ~exact).nonzero() + torch.tensor([r0, 0], device=dev))
    pairs = torch.cat(unsure)
    if pairs.numel():
        mm = make_mask_mod(spec, dev)
        N = spec.seq_len
        step = max(1, (1 << 22) // (bm * bn))
        for e0 in range(0, pairs.shape[0], step):
            qb, kb = pairs[e0:e0 + step].unbind(1)
            qo = perm[(qb[:, None] * bm + torch.arange(bm, device=dev)).clamp_max(N - 1)]
            ko = perm[(kb[:, None] * bn + torch.arange(bn, device=dev)).clamp_max(N - 1)]
            m = mm(None, None, qo[:, :, None], ko[:, None, :]).flatten(1)
            any_, all_ = m.any(1), m.all(1)
            full[qb, kb] = all_
            partial[qb, kb] = any_ & ~all_
    return full, partial, qi, ki, tabs


def _dedup_masks(layout: BlockLayout) -> None:
    """Share identical partial-block masks (NA repeats a handful of border shapes): table rows become unique."""
    tbl = layout.mask_table
    if tbl.shape[0] <= 1:
        return
    uniq, inv = torch.unique(tbl.reshape(tbl.shape[0], -1), dim=0, return_inverse=True)
    layout.mask_table = uniq.view(-1, *tbl.shape[1:]).contiguous()
    layout.partial_mask_ids = inv[layout.partial_mask_ids.long()].to(torch.int32).contiguous()


_CACHE: "OrderedDict[tuple, Tuple[BlockLayout, BlockLayout]]" = OrderedDict()
_CACHE_SIZE = 64


def _build(spec: NASpec, block_size: Tuple[int, int], device: torch.device) -> Tuple[BlockLayout, BlockLayout]:
    bm, bn = block_size
    tile, sub = choose_tiles(spec, block_size)
    perm = token_permutation(spec, tile, device, sub)
    full, partial, qi, ki, tabs = _classify(spec, perm, block_size)
    N = spec.seq_len
    if N % bn:  # layout contract: a ragged last key block is never FULL
        partial[:, -1] |= full[:, -1]
        full[:, -1] = False
    f_idx, f_cnt = (t[None, None] for t in block_lists(full))
    p_idx, p_cnt = (t[None, None] for t in block_lists(partial))
    mm = make_mask_mod(spec, device)
    table, mask_ids = build_mask_table(spec, perm, block_size, tile, p_idx, p_cnt, qi, ki, tabs, mm)
    # the tiled order can be the original one (1-D without dilation, grids of one tile): then no permutation
    # at all, so no gather/scatter copies either
    identity = bool(torch.equal(perm, torch.arange(N, device=perm.device)))
    lperm = None if identity else perm
    layout = BlockLayout(N, N, bm, bn, f_cnt, f_idx, p_cnt, p_idx, mask_ids, table, lperm, lperm, mm)
    _dedup_masks(layout)
    # NA windows are per-axis conditions: with one key sub-tile per block the forward can mask PARTIAL
    # blocks with a one-hot product (None when some mask does not factor, e.g. global tokens in the block)
    layout.mask_factors = factor_masks(layout.mask_table, bn, sub)
    info = {"tile": tile, "sub_tile": sub}
    layout._cache.update(info)
    if identity:
        return layout, layout

    def mm_kernel_order(b, h, q_idx, kv_idx):
        return mm(b, h, perm[q_idx], perm[kv_idx])

    # same lists, no permutation: for callers that already hold tokens in kernel order (nn modules)
    korder = replace(layout, perm_q=None, perm_k=None, mask_mod=mm_kernel_order, _cache=dict(info))
    return layout, korder


def get_layout(spec: NASpec, block_size: Tuple[int, int], device, *, kernel_order: bool = False) -> BlockLayout:
    """The cached layout for ``spec`` (built once per spec, block size and device; LRU of 64 entries).

    ``kernel_order=True`` returns the same block lists without a permutation (inputs already permuted
    with ``get_layout(...).perm_q``); its ``mask_mod`` takes kernel positions.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (spec, tuple(block_size), str(device))
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        with torch.inference_mode(False):  # cached tensors must also serve later autograd calls
            _CACHE[key] = _build(spec, tuple(block_size), device)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return _CACHE[key][1 if kernel_order else 0]


def block_counts(spec: NASpec, block_size: Tuple[int, int], device=None, tiles=None) -> dict:
    """Full / partial / empty block counts and the tile shapes, without building mask tables.

    ``tiles``: a ``(tile, sub_tile)`` pair to count instead of the automatic :func:`choose_tiles`.
    Counts follow the layout contract (a ragged last key block is never FULL).
    """
    bm, bn = block_size
    tile, sub = choose_tiles(spec, block_size) if tiles is None else tiles
    perm = token_permutation(spec, tile, device, sub)
    full, partial = classify_blocks(spec, perm, block_size)
    if spec.seq_len % bn:
        partial[:, -1] |= full[:, -1]
        full[:, -1] = False
    total = full.numel()
    f, p = int(full.sum()), int(partial.sum())
    return {"full": f, "partial": p, "empty": total - f - p, "total": total, "density": (f + p) / total,
            "block_m": bm, "block_n": bn, "tile": tuple(tile), "sub_tile": tuple(sub)}
