"""Token merging (ToMe / ToMeSD-style bipartite soft matching on a 2-D token grid), written for AgentSD.

The graph follows the released ToMeSD/AgentSD recipe (Bolya & Hoffman 2023; Han et al. 2024, ``agentsd/merge.py``):

1. dst set: one token per ``stride = (sy, sx)`` window of the grid (a random one per window, or the top-left);
   grid rows/columns left over when the stride does not divide the grid are src tokens.
2. every src token is linked to its most cosine-similar dst token; src tokens are ranked by that similarity.
3. merging ``r`` tokens averages the ``r`` best-ranked src tokens into their dst tokens (dst included in the mean);
   the merged sequence is ``[unmerged src (ranked order)][dst]`` of length ``N - r`` (``r = 0``: the identity).
4. unmerging copies every merged token back to all original positions it stands for (one ``gather``).

One graph can merge with several ``r`` (AgentSD uses a mild ``r`` for the features and an aggressive one for
the agent tokens). Indices are per batch element (no information crosses batch elements) and shared over heads.

Cost model (what keeps the per-layer overhead small on a GPU; see docs/methods/agent.md "Overhead"):

- No host synchronisation: the dst/src partition is drawn on the CPU (tiny: one offset per window) and sent to
  the device with one non-blocking copy from pinned memory; every shape is known on the host; nothing reads a
  device value back (no ``nonzero``, ``item`` or ``bincount``).
- Everything per ``r`` is one flat slot index ``inv`` (B*N,) into the merged sequence of all batch elements:
  merging any number of token-major tensors is one ``cat`` (with the fp32 upcast), one ``index_add_`` and one
  ``div``; unmerging is one ``index_select``.
- Index tensors that do not depend on the data (aranges, batch offsets, the deterministic partition) are cached
  per shape and device in a :class:`TomeCache` owned by the caller.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _agent_merge as _fm

__all__ = ["BipartiteGraph", "bipartite_graph", "graph_from_partition", "dst_positions", "partition",
           "partition_host", "TomeCache"]


class TomeCache:
    """Data-independent index tensors keyed by (what, shape..., device); bounded (cleared when full)."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._d: Dict[tuple, object] = {}

    def get(self, key: tuple, make):
        val = self._d.get(key)
        if val is None:
            if len(self._d) >= self.max_entries:
                self._d.clear()
            with torch.inference_mode(False):     # cached tensors stay usable outside an inference_mode call
                val = self._d[key] = make()
        return val

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def arange(self, n: int, device) -> torch.Tensor:
        return self.get(("arange", n, str(device)), lambda: torch.arange(n, device=device))


def dst_positions(grid: Tuple[int, int], stride: Tuple[int, int], *, generator: Optional[torch.Generator] = None,
                  randomize: bool = True, device=None) -> torch.Tensor:
    """Sorted flat (row-major) positions of the dst tokens: one per full ``stride`` window of ``grid``.

    ``randomize``: pick a uniformly random token of each window (drawn from ``generator``), else its top-left.
    The draw happens on the CPU (one small integer per window), so a given generator state gives the same dst
    set on every device.
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


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device`` without a host synchronisation (pinned staging + non-blocking copy on CUDA)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def partition_host(grid: Tuple[int, int], stride: Tuple[int, int], *, generator: Optional[torch.Generator] = None,
                   randomize: bool = True, pin: bool = False) -> Tuple[torch.Tensor, int, int]:
    """``(perm, num_src, num_dst)`` on the host: ``perm`` (N,) int64 = ``[src positions | dst positions]``, both
    sorted. The dst draw is :func:`dst_positions`' (same generator calls, same result); the index arithmetic runs in
    numpy (a few microseconds). ``pin``: return page-locked memory (for a non-blocking copy to a GPU)."""
    h, w = grid
    sy, sx = stride
    if sy < 1 or sx < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    hs, ws = h // sy, w // sx
    n = h * w
    perm = torch.empty(n, dtype=torch.long, pin_memory=pin)
    out = perm.numpy()
    if hs == 0 or ws == 0:
        out[:] = np.arange(n)
        return perm, n, 0
    if randomize:
        off = torch.randint(sy * sx, (hs, ws), generator=generator).numpy()
        dst = ((np.arange(hs)[:, None] * sy + off // sx) * w + np.arange(ws)[None, :] * sx + off % sx).ravel()
        dst.sort()
    else:
        dst = (np.arange(hs)[:, None] * (sy * w) + np.arange(ws)[None, :] * sx).ravel()
    is_src = np.ones(n, dtype=bool)
    is_src[dst] = False
    ns = n - dst.size
    out[:ns] = np.flatnonzero(is_src)
    out[ns:] = dst
    return perm, ns, dst.size


def partition(grid: Tuple[int, int], stride: Tuple[int, int], *, generator: Optional[torch.Generator] = None,
              randomize: bool = True, device=None, cache: Optional[TomeCache] = None) -> Tuple[torch.Tensor, int, int]:
    """``(perm, num_src, num_dst)``: ``perm`` (N,) on ``device`` = ``[src positions | dst positions]``, both sorted.

    Built on the host (:func:`partition_host`) and copied once without a sync. The deterministic (top-left)
    partition is cached per (grid, stride, device) in ``cache``; random draws (one per denoising step and layer)
    are not.
    """
    device = torch.device(device if device is not None else "cpu")

    def make():
        perm, ns, nd = partition_host(grid, stride, generator=generator, randomize=randomize,
                                      pin=device.type == "cuda")
        return _to_device(perm, device), ns, nd

    if randomize or cache is None:
        return make()
    return cache.get(("partition", tuple(grid), tuple(stride), str(device)), make)


class BipartiteGraph:
    """A bipartite matching of N tokens (see module doc), per batch element.

    Token-major API (the fast path): ``merge_tokens([x, ...], r)`` for (B, N, C_i) tensors -> merged (B, N - r, C_i)
    tensors (one index_add for all of them), ``unmerge_tokens(y, r)`` for (B, N - r, C) -> (B, N, C).
    ``merge(x, r)`` / ``unmerge(y, r)`` act on dim -2 of (B, N, C) or (B, M, N, C) tensors.

    Attributes: ``num_tokens`` N, ``num_dst``, ``num_src``; ``src_pos``/``dst_pos`` (original positions),
    ``target`` (B, num_src) each src token's dst index, ``best`` its similarity, ``rank`` (B, num_src) src indices
    best-match first (computed on first use: merging every src token needs no ranking).
    """

    def __init__(self, num_tokens: int, src_pos: torch.Tensor, dst_pos: torch.Tensor, rank: Optional[torch.Tensor],
                 target: torch.Tensor, *, best: Optional[torch.Tensor] = None, perm: Optional[torch.Tensor] = None,
                 cache: Optional[TomeCache] = None):
        self.num_tokens = num_tokens
        self.src_pos, self.dst_pos, self.target, self.best = src_pos, dst_pos, target, best
        self._rank = rank
        self.num_src, self.num_dst = src_pos.numel(), dst_pos.numel()
        self.batch = target.shape[0]
        self.perm = torch.cat([src_pos, dst_pos]) if perm is None else perm
        self.device = target.device
        self._c = cache if cache is not None else TomeCache()
        self._slots: Dict[int, torch.Tensor] = {}
        self._legacy: Dict[int, tuple] = {}

    @property
    def rank(self) -> torch.Tensor:
        if self._rank is None:
            self._rank = self.best.argsort(dim=-1, descending=True)
        return self._rank

    def clamp(self, r: int) -> int:
        """``r`` limited to what the graph can merge (at most every src token; none without dst tokens)."""
        return max(0, min(int(r), self.num_src)) if self.num_dst else 0

    def merged_len(self, r: int) -> int:
        return self.num_tokens - self.clamp(r)

    # ---- indices --------------------------------------------------------------------------------------------
    def slots(self, r: int) -> torch.Tensor:
        """``inv`` (B*N,) for merging ``r`` tokens: the flat index (batch offset included) of every original token's
        merged token among the B*(N-r) merged rows (``r = 0``: the identity)."""
        r = self.clamp(r)
        if r in self._slots:
            return self._slots[r]
        b, n, ns, nd, dev, c = self.batch, self.num_tokens, self.num_src, self.num_dst, self.device, self._c
        if r == 0:
            self._slots[0] = c.arange(b * n, dev)
            return self._slots[0]
        n_unm, n_out = ns - r, n - r
        # batch offsets folded into constant tensors (cached per shape)
        off = c.get(("off", b, n_out, str(dev)), lambda: (torch.arange(b, device=dev) * n_out).view(b, 1))
        dst_slots = c.get(("dstslots", b, nd, n_unm, n_out, str(dev)),
                          lambda: (torch.arange(n_unm, n_unm + nd, device=dev).view(1, nd) + off).contiguous())
        inv = torch.empty(b, n, dtype=torch.long, device=dev)
        if r == ns:                                                 # every src merged: no ranking needed
            inv.scatter_(1, self.src_pos.expand(b, ns), self.target + off)
        else:                                                       # ranked src: r merged, the rest in rank order
            rank = self.rank
            shift_m = c.get(("shiftm", b, n_out, n_unm, str(dev)), lambda: off + n_unm)
            unm_slots = c.get(("unmslots", b, n_unm, n_out, str(dev)),
                              lambda: (torch.arange(n_unm, device=dev).view(1, n_unm) + off).contiguous())
            vals = torch.cat([self.target.gather(1, rank[:, :r]) + shift_m, unm_slots], dim=1)
            inv.scatter_(1, self.src_pos[rank], vals)
        inv.scatter_(1, self.dst_pos.expand(b, nd), dst_slots)
        self._slots[r] = inv = inv.view(-1)
        return inv

    def _indices(self, r: int):
        """(unm_pos, msrc_pos, mdst, inv) with per-batch (not flat) ``inv`` (B, N): the reference description."""
        r = self.clamp(r)
        if r not in self._legacy:
            b, n = self.batch, self.num_tokens
            ranked_pos = self.src_pos[self.rank]
            mdst = self.target.gather(1, self.rank[:, :r])
            inv = self.slots(r).view(b, n) - (torch.arange(b, device=self.device) * (n - r)).view(b, 1)
            self._legacy[r] = (ranked_pos[:, r:], ranked_pos[:, :r], mdst, inv)
        return self._legacy[r]

    # ---- token-major merge / unmerge ------------------------------------------------------------------------
    def merge_tokens(self, xs: Sequence[torch.Tensor], r: int, fused: Optional[bool] = None) -> List[torch.Tensor]:
        """Merge ``r`` src tokens of each (B, N, C_i) tensor into their dst (group means, accumulated in fp32).
        Returns (B, N - r, C_i) views of one buffer, in the input dtype.

        ``fused`` (default: on CUDA when Triton imports, not under autograd): two Triton kernels that copy the
        unmerged rows and average only the dst groups (:mod:`._agent_merge`). Otherwise one ``cat`` (upcast, with
        a ones column that counts the groups), one ``index_add_`` and one ``div`` for all the tensors."""
        r = self.clamp(r)
        b, n = self.batch, self.num_tokens
        for x in xs:
            if x.dim() != 3 or x.shape[0] != b or x.shape[1] != n:
                raise ValueError(f"merge_tokens expects ({b}, {n}, C) tensors, got {tuple(x.shape)}")
        if r == 0:
            return list(xs)
        dtype = xs[0].dtype
        widths = [x.shape[2] for x in xs]
        tot, n_out = sum(widths), n - r
        inv = self.slots(r)
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
        if fused is None:
            fused = not grad and len(xs) <= _fm.MAX_INPUTS and _fm.available(xs[0])
        if fused and all(x.dtype == dtype for x in xs):
            return _fm.fused_merge(xs, inv, n_out, self.num_src - r, self.num_dst)
        acc = torch.promote_types(dtype, torch.float32)
        dev = self.device
        # a column of ones rides along: the same index_add counts the group sizes
        ones = self._c.get(("onescol", b, n, acc, str(dev)), lambda: torch.ones(b, n, 1, dtype=acc, device=dev))
        if grad:                                                              # autograd: no out= variants
            src = torch.cat([x.to(acc) for x in xs] + [ones], dim=2).reshape(b * n, tot + 1)
            summed = torch.zeros(b * n_out, tot + 1, dtype=acc, device=dev).index_add(0, inv, src)
            out = (summed[:, :tot] / summed[:, tot:]).to(dtype).view(b, n_out, tot)
        else:
            src = torch.empty(b, n, tot + 1, dtype=acc, device=dev)
            torch.cat(list(xs) + [ones], dim=2, out=src)                      # one pass: concatenate and upcast
            summed = torch.zeros(b * n_out, tot + 1, dtype=acc, device=dev).index_add_(0, inv, src.view(b * n, -1))
            out = torch.empty(b * n_out, tot, dtype=dtype, device=dev)
            torch.div(summed[:, :tot], summed[:, tot:], out=out)              # mean and downcast in one kernel
            out = out.view(b, n_out, tot)
        return list(out.split(widths, dim=2)) if len(xs) > 1 else [out]

    def unmerge_tokens(self, y: torch.Tensor, r: int) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every original token gets its merged token's row (one ``index_select``)."""
        r = self.clamp(r)
        b, n = self.batch, self.num_tokens
        if y.dim() != 3 or y.shape[0] != b or y.shape[1] != n - r:
            raise ValueError(f"unmerge expects ({b}, {n - r}, C), got {tuple(y.shape)}")
        if r == 0:
            return y
        c = y.shape[2]
        return y.reshape(b * (n - r), c).index_select(0, self.slots(r)).view(b, n, c)

    # ---- dim -2 API (B, N, C) or (B, M, N, C) ---------------------------------------------------------------
    def merge(self, x: torch.Tensor, r: int) -> torch.Tensor:
        """Merge ``r`` src tokens of x (B, N, C) or (B, M, N, C) into their dst: (.., N - r, C), mean-reduced."""
        squeeze = x.dim() == 3
        x4 = x.unsqueeze(1) if squeeze else x
        if x4.shape[2] != self.num_tokens:
            raise ValueError(f"merge expects {self.num_tokens} tokens on dim -2, got {x4.shape[2]}")
        b, m, n, c = x4.shape
        out = self.merge_tokens([x4.transpose(1, 2).reshape(b, n, m * c)], r)[0]
        out = out.view(b, -1, m, c).transpose(1, 2)
        return out.squeeze(1) if squeeze else out

    def unmerge(self, y: torch.Tensor, r: int) -> torch.Tensor:
        """Inverse of :meth:`merge` for the outputs: every original token gets its merged token's value."""
        squeeze = y.dim() == 3
        y4 = y.unsqueeze(1) if squeeze else y
        r = self.clamp(r)
        if y4.shape[2] != self.num_tokens - r:
            raise ValueError(f"unmerge expects {self.num_tokens - r} tokens on dim -2, got {y4.shape[2]}")
        b, m, n_out, c = y4.shape
        out = self.unmerge_tokens(y4.transpose(1, 2).reshape(b, n_out, m * c), r)
        out = out.view(b, self.num_tokens, m, c).transpose(1, 2)
        return out.squeeze(1) if squeeze else out


#: similarity rows computed at once (B * rows * num_dst elements): bounds the (src x dst) buffer at large grids
_SIM_CHUNK = 1 << 26


def bipartite_graph(metric: torch.Tensor, grid: Tuple[int, int], stride: Tuple[int, int], *,
                    generator: Optional[torch.Generator] = None, randomize: bool = True,
                    cache: Optional[TomeCache] = None) -> BipartiteGraph:
    """Build the ToMe graph from ``metric`` (B, N, C) over a row-major ``grid`` with N = h * w tokens."""
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    if math.prod(grid) != metric.shape[1]:
        raise ValueError(f"grid {grid} does not hold {metric.shape[1]} tokens")
    perm, ns, nd = partition(tuple(grid), tuple(stride), generator=generator, randomize=randomize,
                             device=metric.device, cache=cache)
    return graph_from_partition(metric, perm, ns, nd, cache=cache)


def graph_from_partition(metric: torch.Tensor, perm: torch.Tensor, ns: int, nd: int, *,
                         cache: Optional[TomeCache] = None) -> BipartiteGraph:
    """The ToMe graph of ``metric`` (B, N, C) for a given partition ``perm`` = [src | dst] (on the metric's device).

    Similarity is the cosine of the metric rows in the metric's dtype (as released); the (src x dst) matrix is
    processed in row chunks of at most ``_SIM_CHUNK`` elements, so it never needs more than ~128 MB in bf16.
    Device work only (no host reads): this is the part a CUDA graph can capture.
    """
    b, n, _ = metric.shape
    dev = metric.device
    src_pos, dst_pos = perm[:ns], perm[ns:]
    with torch.no_grad():
        if nd == 0 or ns == 0:
            target = torch.zeros(b, ns, dtype=torch.long, device=dev)
            rank = torch.arange(ns, device=dev).expand(b, -1).contiguous()
            return BipartiteGraph(n, src_pos, dst_pos, rank, target, perm=perm, cache=cache)
        m = metric.index_select(1, perm)                                  # (B, N, C): [src | dst]
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, bt = m[:, :ns], m[:, ns:].transpose(-1, -2)
        rows = max(1, _SIM_CHUNK // max(1, b * nd))
        if rows >= ns:
            best, target = (a @ bt).max(dim=-1)
        else:
            parts = [(a[:, i:i + rows] @ bt).max(dim=-1) for i in range(0, ns, rows)]
            best = torch.cat([p[0] for p in parts], dim=1)
            target = torch.cat([p[1] for p in parts], dim=1)
    return BipartiteGraph(n, src_pos, dst_pos, None, target, best=best, perm=perm, cache=cache)
