"""Bit-packed masks of an NA layout's PARTIAL blocks, evaluated once per distinct block-pair shape.

Inside the complete tiles every block is a box whose tokens run row-major, so the mask of a (query block,
key block) pair depends only on, per axis: both boxes' extents and the query rows' window bounds relative
to the key box's start (clamped to the box). Pairs with equal signatures share one evaluated mask; only
a few hundred signatures exist even for 10^5 partial blocks. Other pairs (border tokens of ragged tiles,
global tokens, the ragged last block) are evaluated directly from the element predicate.
"""
from __future__ import annotations

import math
from typing import Callable, List, Tuple

import torch

from ..kernels.layout import pack_bits
from ._na_mask import NASpec

__all__ = ["build_mask_table", "complete_tile_tokens"]


def complete_tile_tokens(spec: NASpec, tile: Tuple[int, ...]) -> int:
    """Grid tokens lying in complete tiles (they come first in kernel order)."""
    return math.prod(sum((lg // t) * t for lg in spec.group_extents(a)) for a, t in enumerate(tile))


def _eval_masks(mm: Callable, perm: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, bm: int, bn: int,
                n: int) -> torch.Tensor:
    """Packed masks (E, bm, ceil(bn/32)) of block pairs from the element predicate (keys >= n cleared)."""
    dev = perm.device
    out = []
    step = max(1, (1 << 22) // (bm * bn))
    for e0 in range(0, qb.numel(), step):
        q = qb[e0:e0 + step, None] * bm + torch.arange(bm, device=dev)
        k = kb[e0:e0 + step, None] * bn + torch.arange(bn, device=dev)
        m = mm(None, None, perm[q.clamp_max(n - 1)][:, :, None], perm[k.clamp_max(n - 1)][:, None, :])
        out.append(pack_bits(m.expand(q.shape[0], bm, bn) & (k < n)[:, None, :]))
    return torch.cat(out) if out else torch.zeros(0, bm, (bn + 31) // 32, dtype=torch.int32, device=dev)


def _signatures(spec: NASpec, tile, qb, kb, qi, ki, tabs) -> torch.Tensor:
    parts: List[torch.Tensor] = []
    dev = qb.device
    for a, (_, _, lo, hi) in enumerate(tabs):
        L, d, T = spec.shape[a], spec.dilation[a], tile[a]
        q0, k0 = qi["kmin"][qb, a], ki["kmin"][kb, a]
        ql = qi["kmax"][qb, a] - q0 + 1
        kl = ki["kmax"][kb, a] - k0 + 1
        t = torch.arange(T, device=dev)
        x = (qi["gax"][qb, a, None] + d * (q0[:, None] + t)).clamp_max(L - 1)  # original coordinates
        lo_o = torch.minimum((lo[x] - k0[:, None]).clamp_min(0), kl[:, None])
        hi_o = torch.minimum((hi[x] - k0[:, None]).clamp_min(-1), kl[:, None] - 1)
        valid = t < ql[:, None]
        parts += [ql[:, None], kl[:, None], torch.where(valid, lo_o, -2), torch.where(valid, hi_o, -2)]
    return torch.cat(parts, 1)


def build_mask_table(spec: NASpec, perm: torch.Tensor, block_size: Tuple[int, int], tile, p_idx: torch.Tensor,
                     p_cnt: torch.Tensor, qi: dict, ki: dict, tabs, mm: Callable) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mask_table, partial_mask_ids)`` for the PARTIAL lists ``p_idx`` (1, 1, nQB, P) / ``p_cnt``."""
    bm, bn = block_size
    dev, N = perm.device, spec.seq_len
    mask_ids = torch.zeros_like(p_idx)
    sel = torch.arange(p_idx.shape[-1], device=dev) < p_cnt[0, 0].unsqueeze(-1)
    qb, slot = sel.nonzero().unbind(1)
    if qb.numel() == 0:
        return torch.zeros(1, bm, (bn + 31) // 32, dtype=torch.int32, device=dev), mask_ids
    kb = p_idx[0, 0, qb, slot].long()
    nc = complete_tile_tokens(spec, tile)  # kernel positions [0, nc) hold the complete tiles
    elig = qi["box"][qb] & ki["box"][kb] & ((qb + 1) * bm <= nc) & ((kb + 1) * bn <= nc)
    ids = torch.zeros(qb.numel(), dtype=torch.long, device=dev)
    tables = []
    if bool(elig.any()):
        qe, ke = qb[elig], kb[elig]
        sig = _signatures(spec, tile, qe, ke, qi, ki, tabs)
        _, inv = torch.unique(sig, dim=0, return_inverse=True)
        n_u = int(inv.max()) + 1
        rep = torch.full((n_u,), qe.numel(), dtype=torch.long, device=dev)
        rep.scatter_reduce_(0, inv, torch.arange(qe.numel(), device=dev), "amin")
        tables.append(_eval_masks(mm, perm, qe[rep], ke[rep], bm, bn, N))
        ids[elig] = inv
    rest = (~elig).nonzero().flatten()
    if rest.numel():
        base = sum(t.shape[0] for t in tables)
        tables.append(_eval_masks(mm, perm, qb[rest], kb[rest], bm, bn, N))
        ids[rest] = base + torch.arange(rest.numel(), device=dev)
    mask_ids[0, 0, qb, slot] = ids.to(torch.int32)
    return torch.cat(tables).contiguous(), mask_ids.contiguous()
