"""Token merging (ToMe / ToMeSD-style bipartite soft matching on a 2-D token grid), written for AgentSD.

The graph follows the released ToMeSD/AgentSD recipe (Bolya & Hoffman 2023; Han et al. 2024, ``agentsd/merge.py``):

1. dst set: one token per ``stride = (sy, sx)`` window of the grid (a random one per window, or the top-left);
   grid rows/columns left over when the stride does not divide the grid are src tokens.
2. every src token is linked to its most cosine-similar dst token; src tokens are ranked by that similarity.
3. merging ``r`` tokens averages the ``r`` best-ranked src tokens into their dst tokens (dst included in the mean);
   the merged sequence is ``[unmerged src (ranked order)][dst]`` of length ``N - r``.
4. unmerging copies every merged token back to all original positions it stands for (one ``gather``).

One graph can merge with several ``r`` (AgentSD uses a mild ``r`` for the features and an aggressive one for
the agent tokens). Indices are per batch element (no information crosses batch elements) and shared over heads.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["BipartiteGraph", "bipartite_graph", "dst_positions"]


def dst_positions(grid: Tuple[int, int], stride: Tuple[int, int], *, generator: Optional[torch.Generator] = None,
                  randomize: bool = True, device=None) -> torch.Tensor:
    """Sorted flat (row-major) positions of the dst tokens: one per full ``stride`` window of ``grid``.

    ``randomize``: pick a uniformly random token of each window (drawn from ``generator``), else its top-left.
    """
    h, w = grid
    sy, sx = stride
    if sy < 1 or sx < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    hs, ws = h // sy, w // sx
    if hs == 0 or ws == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if randomize:
        off = torch.randint(sy * sx, (hs, ws), generator=generator)
    else:
        off = torch.zeros(hs, ws, dtype=torch.long)
    rows = torch.arange(hs).view(hs, 1) * sy + off // sx
    cols = torch.arange(ws).view(1, ws) * sx + off % sx
    return (rows * w + cols).flatten().sort().values.to(device)


class BipartiteGraph:
    """A bipartite matching of N tokens (see module doc). ``merge(x, r)`` / ``unmerge(y, r)`` act on dim -2.

    Attributes: ``num_tokens`` N, ``num_dst``, ``num_src``; ``src_pos``/``dst_pos`` (original positions),
    ``rank`` (B, num_src) src indices best-match first, ``target`` (B, num_src) each src token's dst index.
    """

    def __init__(self, num_tokens: int, src_pos: torch.Tensor, dst_pos: torch.Tensor, rank: torch.Tensor,
                 target: torch.Tensor):
        self.num_tokens = num_tokens
        self.src_pos, self.dst_pos, self.rank, self.target = src_pos, dst_pos, rank, target
        self.num_src, self.num_dst = src_pos.numel(), dst_pos.numel()
        self._cache = {}

    def clamp(self, r: int) -> int:
        """``r`` limited to what the graph can merge (at most every src token; none without dst tokens)."""
        return max(0, min(int(r), self.num_src)) if self.num_dst else 0

    def _indices(self, r: int):
        r = self.clamp(r)
        if r not in self._cache:
            b = self.rank.shape[0]
            ranked_pos = self.src_pos[self.rank]                            # (B, Ns) original positions
            unm_pos = ranked_pos[:, r:]                                     # (B, Ns - r)
            msrc_pos = ranked_pos[:, :r]                                    # (B, r)
            mdst = self.target.gather(1, self.rank[:, :r])                  # (B, r) dst index of each merged src
            # inverse map: original position -> index in the merged sequence [unm | dst]
            n_unm = self.num_src - r
            inv = torch.empty(b, self.num_tokens, dtype=torch.long, device=self.rank.device)
            ar = torch.arange(n_unm, device=inv.device).expand(b, n_unm)
            inv.scatter_(1, unm_pos, ar)
            inv[:, self.dst_pos] = n_unm + torch.arange(self.num_dst, device=inv.device)
            inv.scatter_(1, msrc_pos, n_unm + mdst)
            self._cache[r] = (unm_pos, msrc_pos, mdst, inv)
        return self._cache[r]

    @staticmethod
    def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (B, M, N, C), idx (B, K) -> (B, M, K, C)."""
        b, m, _, c = x.shape
        return x.gather(2, idx[:, None, :, None].expand(b, m, idx.shape[1], c))

    def merge(self, x: torch.Tensor, r: int) -> torch.Tensor:
        """Merge ``r`` src tokens of x (B, N, C) or (B, M, N, C) into their dst: (.., N - r, C), mean-reduced."""
        squeeze = x.dim() == 3
        x4 = x.unsqueeze(1) if squeeze else x
        if x4.shape[2] != self.num_tokens:
            raise ValueError(f"merge expects {self.num_tokens} tokens on dim -2, got {x4.shape[2]}")
        unm_pos, msrc_pos, mdst, _ = self._indices(r)
        unm = self._gather(x4, unm_pos)
        dst = x4.index_select(2, self.dst_pos)
        if msrc_pos.shape[1]:
            src = self._gather(x4, msrc_pos)
            b, m, _, c = x4.shape
            idx = mdst[:, None, :, None].expand(b, m, mdst.shape[1], c)
            # fp32 accumulation: exact means for half inputs and no reliance on half-precision atomics
            acc = torch.promote_types(x.dtype, torch.float32)
            dst = dst.to(acc).scatter_reduce(2, idx, src.to(acc), reduce="mean", include_self=True).to(x.dtype)
        out = torch.cat([unm, dst], dim=2)
        return out.squeeze(1) if squeeze else out

    def unmerge(self, y: torch.Tensor, r: int) -> torch.Tensor:
        """Inverse of :meth:`merge` for the outputs: every original token gets its merged token's value."""
        squeeze = y.dim() == 3
        y4 = y.unsqueeze(1) if squeeze else y
        r = self.clamp(r)
        if y4.shape[2] != self.num_tokens - r:
            raise ValueError(f"unmerge expects {self.num_tokens - r} tokens on dim -2, got {y4.shape[2]}")
        inv = self._indices(r)[3]
        out = self._gather(y4, inv)
        return out.squeeze(1) if squeeze else out


def bipartite_graph(metric: torch.Tensor, grid: Tuple[int, int], stride: Tuple[int, int], *,
                    generator: Optional[torch.Generator] = None, randomize: bool = True) -> BipartiteGraph:
    """Build the ToMe graph from ``metric`` (B, N, C) over a row-major ``grid`` with N = h * w tokens."""
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    b, n, _ = metric.shape
    if math.prod(grid) != n:
        raise ValueError(f"grid {grid} does not hold {n} tokens")
    dev = metric.device
    dst_pos = dst_positions(grid, stride, generator=generator, randomize=randomize, device=dev)
    is_dst = torch.zeros(n, dtype=torch.bool, device=dev)
    is_dst[dst_pos] = True
    src_pos = torch.nonzero(~is_dst).flatten()
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, bb = m.index_select(1, src_pos), m.index_select(1, dst_pos)
        if dst_pos.numel() == 0 or src_pos.numel() == 0:
            target = torch.zeros(b, src_pos.numel(), dtype=torch.long, device=dev)
            rank = torch.arange(src_pos.numel(), device=dev).expand(b, -1).contiguous()
        else:
            best, target = (a @ bb.transpose(-1, -2)).max(dim=-1)
            rank = best.argsort(dim=-1, descending=True)
    return BipartiteGraph(n, src_pos, dst_pos, rank, target)
