"""`BlockLayout`: which key blocks each query block visits, split into FULL and PARTIAL blocks.

Coordinates. A layout lives in *kernel order*: if a token permutation is set, position ``i`` of the
permuted sequence holds original token ``perm_q[i]`` (``perm_k`` for keys). Block lists refer to
kernel order; element predicates (``mask_mod``) always take *original* positions.

Storage (all int32, on the layout's device; the leading two dims are batch and head, each either the
real size or 1 for "shared by all"):

* ``full_counts (Bl, Hl, nQB)`` / ``full_indices (Bl, Hl, nQB, F)``: key blocks with every element kept.
* ``partial_counts`` / ``partial_indices (Bl, Hl, nQB, P)``: key blocks where only some elements are kept;
  ``partial_mask_ids`` points each entry at a row of ``mask_table (M, BLOCK_M, ceil(BLOCK_N/32))``,
  a bit-packed element mask (bit ``j`` of word ``w`` is key column ``32*w + j`` of the block).

Optional ``mask_factors = (bias (M, BLOCK_M, W), onehot (W, BLOCK_N))`` (bf16, from :func:`factor_masks`):
the same masks written as per-row, per-axis additive biases (0 kept, ``-MASK_BIG`` dropped) and a one-hot
map from key columns to axis coordinates, so that ``bias[m] @ onehot`` is 0 on kept elements and at most
``-MASK_BIG`` elsewhere. Kernels may use it to mask PARTIAL blocks with one small matrix product instead of
per-element bit tests; ``mask_table`` stays the source of truth.

Each row's lists are sorted ascending; entries past the count are padding (0). A key block that runs
past ``seq_len_k`` is never FULL: constructors move it to PARTIAL with the out-of-range bits cleared,
so kernels need no bounds test on FULL blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple, Union

import torch

__all__ = ["BlockLayout", "MaskMod", "block_lists", "pack_bits", "unpack_bits", "factor_masks", "MASK_BIG"]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``mask_mod(b, h, q_idx, kv_idx) -> bool``, called with broadcastable int64 tensors (original positions)."""

IntPair = Union[int, Tuple[int, int]]


def _pair(x: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(x, int):
        x = (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2 or min(x) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {x!r}")
    return x  # type: ignore[return-value]


def _words(block_n: int) -> int:
    return (block_n + 31) // 32


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (..., BLOCK_N) along the last dim into int32 words (..., ceil(BLOCK_N/32))."""
    *lead, bn = mask.shape
    nw = _words(bn)
    padded = torch.zeros(*lead, nw * 32, dtype=torch.int64, device=mask.device)
    padded[..., :bn] = mask.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    words = (padded.view(*lead, nw, 32) * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32 range
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor, block_n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words (..., W) -> bool (..., block_n)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :block_n].bool()


MASK_BIG = 2.0 ** 100  # exact in bf16; far beyond any real score, finite so one-hot products stay NaN-free
_FACTOR_MAX_WIDTH = 32  # wider one-hot maps (1-D blocks) would cost more than the bit tests they replace


def factor_masks(mask_table: torch.Tensor, block_n: int,
                 dims: Tuple[int, ...]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Write bit-packed block masks as sums of per-axis biases, or ``None`` if they do not factor.

    Key column ``c`` of a block is taken as the row-major point ``unravel(c, dims)`` (``prod(dims) ==
    block_n``, e.g. an 8x8 key tile). Every mask row must be the AND of one condition per axis (as
    neighborhood windows are); this is checked exactly. Returns ``(bias, onehot)``: ``bias (M, BLOCK_M, W)``
    holds 0 where a row keeps that axis coordinate and ``-MASK_BIG`` where not, ``onehot (W, block_n)``
    maps columns to their coordinates, ``W = sum(dims)`` rounded up to 16; both bf16. ``bias[m] @ onehot``
    is 0 exactly on kept elements.
    """
    if math.prod(int(d) for d in dims) != block_n:
        return None
    dims = tuple(int(d) for d in dims if int(d) > 1) or (1,)  # axes of extent 1 need no factor
    width = sum(dims)
    if width > _FACTOR_MAX_WIDTH:
        return None
    M, bm, _ = mask_table.shape
    keep = unpack_bits(mask_table, block_n).view(M, bm, *dims)
    n = len(dims)
    # (M, bm, d_a) per axis; no empty-dims reduction for one axis (its meaning has varied across torch versions)
    proj = [keep if n == 1 else keep.any(dim=tuple(2 + b for b in range(n) if b != a)) for a in range(n)]
    rebuilt = None
    for a, pa in enumerate(proj):
        shape = [M, bm] + [dims[b] if b == a else 1 for b in range(n)]
        term = pa.view(shape)
        rebuilt = term if rebuilt is None else rebuilt & term
    if not torch.equal(rebuilt.expand_as(keep), keep):
        return None
    W = -(-width // 16) * 16
    dev = mask_table.device
    bias = torch.zeros(M, bm, W, dtype=torch.float32, device=dev)
    onehot = torch.zeros(W, block_n, dtype=torch.float32, device=dev)
    coords = torch.stack(torch.unravel_index(torch.arange(block_n, device=dev), dims))  # (n, block_n)
    off = 0
    for a, pa in enumerate(proj):
        bias[..., off:off + dims[a]] = torch.where(pa, 0.0, -MASK_BIG)
        onehot[off + coords[a], torch.arange(block_n, device=dev)] = 1.0
        off += dims[a]
    return bias.to(torch.bfloat16).contiguous(), onehot.to(torch.bfloat16).contiguous()


def block_lists(valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """From a bool selection (..., nKB) produce sorted int32 index lists (..., K) padded with 0, and counts (...)."""
    counts = valid.sum(-1).to(torch.int32)
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    nkb = valid.shape[-1]
    ar = torch.arange(nkb, device=valid.device).expand_as(valid)
    key = torch.where(valid, ar, ar + nkb)  # selected first, in ascending order
    order = key.sort(-1).values[..., :width]
    idx = torch.where(order < nkb, order, torch.zeros_like(order))
    return idx.to(torch.int32).contiguous(), counts.contiguous()


@dataclass
class BlockLayout:
    """Block-sparse attention pattern; see the module docstring for the storage contract."""

    seq_len_q: int
    seq_len_k: int
    block_m: int
    block_n: int
    full_counts: torch.Tensor
    full_indices: torch.Tensor
    partial_counts: torch.Tensor
    partial_indices: torch.Tensor
    partial_mask_ids: torch.Tensor
    mask_table: torch.Tensor
    perm_q: Optional[torch.Tensor] = None
    perm_k: Optional[torch.Tensor] = None
    mask_mod: Optional[MaskMod] = None
    mask_factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.seq_len_q / self.block_m)

    @property
    def num_k_blocks(self) -> int:
        return math.ceil(self.seq_len_k / self.block_n)

    @property
    def batch_dim(self) -> int:
        return self.full_counts.shape[0]

    @property
    def head_dim_(self) -> int:
        return self.full_counts.shape[1]

    @property
    def device(self) -> torch.device:
        return self.full_counts.device

    @property
    def inv_perm_q(self) -> Optional[torch.Tensor]:
        return self._inverse(self.perm_q, "inv_q")

    @property
    def inv_perm_k(self) -> Optional[torch.Tensor]:
        return self._inverse(self.perm_k, "inv_k")

    def _inverse(self, perm: Optional[torch.Tensor], key: str) -> Optional[torch.Tensor]:
        if perm is None:
            return None
        inv = self._cache.get(key)
        if inv is None:
            with torch.inference_mode(False):  # cached: must also serve later autograd calls
                inv = torch.argsort(perm)
            # inside a CUDA-graph capture the argsort only runs at replay: never cache such a tensor
            if not (inv.is_cuda and torch.cuda.is_current_stream_capturing()):
                self._cache[key] = inv
        return inv

    def check_compatible(self, batch: int, heads: int, seq_len_q: int, seq_len_k: int) -> None:
        """Raise ``ValueError`` if this layout cannot serve q (batch, heads, seq_len_q) / k (seq_len_k)."""
        if (seq_len_q, seq_len_k) != (self.seq_len_q, self.seq_len_k):
            raise ValueError(
                f"layout was built for seq_lens=({self.seq_len_q}, {self.seq_len_k}) but q/k have "
                f"({seq_len_q}, {seq_len_k})")
        if self.batch_dim not in (1, batch):
            raise ValueError(f"layout batch dim is {self.batch_dim}; q has batch {batch} (allowed: 1 or {batch})")
        if self.head_dim_ not in (1, heads):
            raise ValueError(f"layout head dim is {self.head_dim_}; q has {heads} heads (allowed: 1 or {heads})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, *, block_size: IntPair,
                        seq_lens: Union[int, Tuple[int, int]], perm_q: Optional[torch.Tensor] = None,
                        perm_k: Optional[torch.Tensor] = None) -> "BlockLayout":
        """From a boolean block mask ``(B|1, H|1, nQB, nKB)`` in kernel order: True blocks are kept whole."""
        bm, bn = _pair(block_size, "block_size")
        nq, nk = _pair(seq_lens, "seq_lens")
        if block_mask.dtype != torch.bool or block_mask.dim() != 4:
            raise ValueError(f"block_mask must be a 4-D bool tensor (B|1, H|1, nQB, nKB), got "
                             f"{block_mask.dtype} with shape {tuple(block_mask.shape)}")
        want = (math.ceil(nq / bm), math.ceil(nk / bn))
        if tuple(block_mask.shape[2:]) != want:
            raise ValueError(f"block_mask has {tuple(block_mask.shape[2:])} blocks; seq_lens={nq, nk} with "
                             f"block_size={bm, bn} needs {want}")
        partial = torch.zeros_like(block_mask)
        full = block_mask.clone()
        if nk % bn:
            partial[..., -1] = full[..., -1]
            full[..., -1] = False
        layout = cls._from_classes(full, partial, bm, bn, nq, nk, perm_q, perm_k, mask_mod=None)
        return layout

    @classmethod
    def from_mask_mod(cls, mask_mod: MaskMod, *, batch: Optional[int], heads: Optional[int],
                      seq_lens: Union[int, Tuple[int, int]], block_size: IntPair = 128,
                      device: Union[str, torch.device, None] = None, perm_q: Optional[torch.Tensor] = None,
                      perm_k: Optional[torch.Tensor] = None, chunk_elems: int = 1 << 24) -> "BlockLayout":
        """From an element predicate in original positions. ``batch``/``heads`` None (or 1) means shared.

        Blocks are classified FULL / PARTIAL / EMPTY on ``device`` in chunks of query blocks, so memory
        stays bounded by ``chunk_elems`` booleans; no N x N tensor is ever built.
        """
        bm, bn = _pair(block_size, "block_size")
        nq, nk = _pair(seq_lens, "seq_lens")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        B, H = batch or 1, heads or 1
        perm_q = None if perm_q is None else perm_q.to(dev, torch.long)
        perm_k = None if perm_k is None else perm_k.to(dev, torch.long)
        nqb, nkb = math.ceil(nq / bm), math.ceil(nk / bn)
        kpos = torch.arange(nkb * bn, device=dev)
        kvalid = kpos < nk
        korig = kpos.clamp_max(nk - 1) if perm_k is None else perm_k[kpos.clamp_max(nk - 1)]
        full = torch.zeros(B, H, nqb, nkb, dtype=torch.bool, device=dev)
        partial = torch.zeros_like(full)
        rows_per_chunk = max(1, chunk_elems // max(1, B * H * bm * nkb * bn))
        b_idx = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h_idx = torch.arange(H, device=dev).view(1, H, 1, 1)
        for q0 in range(0, nqb, rows_per_chunk):
            q1 = min(nqb, q0 + rows_per_chunk)
            qpos = torch.arange(q0 * bm, q1 * bm, device=dev)
            qvalid = qpos < nq
            qorig = qpos.clamp_max(nq - 1) if perm_q is None else perm_q[qpos.clamp_max(nq - 1)]
            m = mask_mod(b_idx, h_idx, qorig.view(1, 1, -1, 1), korig.view(1, 1, 1, -1))
            m = torch.as_tensor(m, device=dev).expand(B, H, qpos.numel(), kpos.numel())
            m = m & kvalid.view(1, 1, 1, -1)
            m = m.view(B, H, q1 - q0, bm, nkb, bn)
            qv = qvalid.view(q1 - q0, bm)[None, None, :, :, None, None]
            any_ = (m & qv).any(-1).any(-2)
            # a block is FULL when every (valid query, any key) element is kept, keys in range included
            all_ = (m | ~qv).all(-1).all(-2) & kvalid.view(nkb, bn).all(-1)
            full[:, :, q0:q1] = all_
            partial[:, :, q0:q1] = any_ & ~all_
        return cls._from_classes(full, partial, bm, bn, nq, nk, perm_q, perm_k, mask_mod=mask_mod)

    @classmethod
    def from_indices(cls, full_indices: torch.Tensor, full_counts: torch.Tensor, *, block_size: IntPair,
                     seq_lens: Union[int, Tuple[int, int]], partial_indices: Optional[torch.Tensor] = None,
                     partial_counts: Optional[torch.Tensor] = None, mask_mod: Optional[MaskMod] = None,
                     perm_q: Optional[torch.Tensor] = None, perm_k: Optional[torch.Tensor] = None) -> "BlockLayout":
        """From explicit sorted per-row lists (B|1, H|1, nQB, K) with counts (B|1, H|1, nQB).

        PARTIAL entries need ``mask_mod`` (original positions); it is evaluated only inside those blocks.
        """
        bm, bn = _pair(block_size, "block_size")
        nq, nk = _pair(seq_lens, "seq_lens")
        nkb = math.ceil(nk / bn)
        full = cls._lists_to_dense(full_indices, full_counts, nkb)
        if partial_indices is not None:
            if mask_mod is None:
                raise ValueError("partial_indices need a mask_mod (the element predicate for PARTIAL blocks)")
            partial = cls._lists_to_dense(partial_indices, partial_counts, nkb)
        else:
            partial = torch.zeros_like(full)
        if nk % bn:
            partial[..., -1] |= full[..., -1]
            full[..., -1] = False
        if partial.any() and mask_mod is None:  # only a ragged tail: mask_mod = keep all in-range keys
            mask_mod = _keep_all
        partial &= ~full
        return cls._from_classes(full, partial, bm, bn, nq, nk, perm_q, perm_k, mask_mod=mask_mod)

    @staticmethod
    def _lists_to_dense(indices: torch.Tensor, counts: Optional[torch.Tensor], nkb: int) -> torch.Tensor:
        if indices.dim() != 4:
            raise ValueError(f"index lists must be 4-D (B|1, H|1, nQB, K), got shape {tuple(indices.shape)}")
        if counts is None:
            counts = torch.full(indices.shape[:3], indices.shape[3], dtype=torch.int32, device=indices.device)
        valid = torch.arange(indices.shape[3], device=indices.device) < counts.unsqueeze(-1)
        if bool(((indices < 0) | (indices >= nkb))[valid].any()):
            raise ValueError(f"block indices must lie in [0, {nkb})")
        dense = torch.zeros(*indices.shape[:3], nkb + 1, dtype=torch.bool, device=indices.device)
        idx = torch.where(valid, indices.long(), torch.full_like(indices.long(), nkb))
        dense.scatter_(-1, idx, True)
        return dense[..., :nkb]

    @classmethod
    def _from_classes(cls, full: torch.Tensor, partial: torch.Tensor, bm: int, bn: int, nq: int, nk: int,
                      perm_q, perm_k, mask_mod) -> "BlockLayout":
        for name, p, n in (("perm_q", perm_q, nq), ("perm_k", perm_k, nk)):
            if p is not None and (p.dim() != 1 or p.numel() != n):
                raise ValueError(f"{name} must be a 1-D permutation of length {n}, got shape {tuple(p.shape)}")
        dev = full.device
        perm_q = None if perm_q is None else perm_q.to(dev, torch.long)
        perm_k = None if perm_k is None else perm_k.to(dev, torch.long)
        f_idx, f_cnt = block_lists(full)
        p_idx, p_cnt = block_lists(partial)
        Bl, Hl, nqb, _ = full.shape
        # evaluate the predicate inside each partial block and bit-pack it
        sel = torch.arange(p_idx.shape[-1], device=dev) < p_cnt.unsqueeze(-1)
        entries = sel.nonzero()  # (E, 4): b, h, qb, slot
        E = entries.shape[0]
        mask_ids = torch.zeros_like(p_idx)
        nw = _words(bn)
        if E == 0:
            table = torch.zeros(1, bm, nw, dtype=torch.int32, device=dev)
        else:
            if mask_mod is None:
                mask_mod = _keep_all
            b, h, qb, slot = entries.unbind(1)
            kb = p_idx[b, h, qb, slot].long()
            chunks = []
            step = max(1, (1 << 22) // (bm * bn))
            for e0 in range(0, E, step):
                sl = slice(e0, e0 + step)
                qpos = qb[sl, None] * bm + torch.arange(bm, device=dev)
                kpos = kb[sl, None] * bn + torch.arange(bn, device=dev)
                kval = kpos < nk
                qo = qpos.clamp_max(nq - 1)
                ko = kpos.clamp_max(nk - 1)
                if perm_q is not None:
                    qo = perm_q[qo]
                if perm_k is not None:
                    ko = perm_k[ko]
                m = mask_mod(b[sl, None, None], h[sl, None, None], qo[:, :, None], ko[:, None, :])
                m = torch.as_tensor(m, device=dev).expand(qo.shape[0], bm, bn) & kval[:, None, :]
                chunks.append(pack_bits(m))
            table = torch.cat(chunks).contiguous()
            mask_ids[b, h, qb, slot] = torch.arange(E, device=dev, dtype=torch.int32)
        return cls(nq, nk, bm, bn, f_cnt, f_idx, p_cnt, p_idx, mask_ids.contiguous(), table,
                   perm_q, perm_k, mask_mod)

    # ------------------------------------------------------------------ views
    def block_classes(self) -> torch.Tensor:
        """int8 (Bl, Hl, nQB, nKB): 0 empty, 1 partial, 2 full (kernel order)."""
        nkb = self.num_k_blocks
        out = torch.zeros(*self.full_counts.shape, nkb + 1, dtype=torch.int8, device=self.device)
        for cnt, idx, val in ((self.partial_counts, self.partial_indices, 1), (self.full_counts, self.full_indices, 2)):
            valid = torch.arange(idx.shape[-1], device=self.device) < cnt.unsqueeze(-1)
            col = torch.where(valid, idx.long(), torch.full_like(idx, nkb, dtype=torch.long))  # padding -> spare column
            out.scatter_(-1, col, torch.full(col.shape, val, dtype=torch.int8, device=self.device))
        out = out[..., :nkb].contiguous()
        return out

    def stats(self) -> dict:
        """Block counts over the stored (B|1, H|1) rows: full, partial, empty, total, density."""
        full = int(self.full_counts.sum())
        partial = int(self.partial_counts.sum())
        total = self.batch_dim * self.head_dim_ * self.num_q_blocks * self.num_k_blocks
        return {"full": full, "partial": partial, "empty": total - full - partial, "total": total,
                "density": (full + partial) / total, "block_m": self.block_m, "block_n": self.block_n,
                "permuted": self.perm_q is not None or self.perm_k is not None}

    def density(self) -> float:
        """Fraction of (query block, key block) pairs that are visited (full or partial)."""
        return self.stats()["density"]

    def to_dense(self, *, original_order: bool = True) -> torch.Tensor:
        """Element mask (Bl, Hl, Nq, Nk) as bool. Small inputs only (tests, the reference backend)."""
        key = ("dense", original_order)
        if key in self._cache:
            return self._cache[key]
        cls_ = self.block_classes()
        bm, bn, nq, nk = self.block_m, self.block_n, self.seq_len_q, self.seq_len_k
        dense = (cls_ == 2).repeat_interleave(bm, 2).repeat_interleave(bn, 3)
        valid = torch.arange(self.partial_indices.shape[-1], device=self.device) < self.partial_counts.unsqueeze(-1)
        ent = valid.nonzero()
        if ent.numel():
            b, h, qb, slot = ent.unbind(1)
            kb = self.partial_indices[b, h, qb, slot].long()
            bits = unpack_bits(self.mask_table[self.partial_mask_ids[b, h, qb, slot].long()], bn)
            rows = qb[:, None, None] * bm + torch.arange(bm, device=self.device)[None, :, None]
            cols = kb[:, None, None] * bn + torch.arange(bn, device=self.device)[None, None, :]
            dense[b[:, None, None], h[:, None, None], rows, cols] = bits
        dense = dense[:, :, :nq, :nk]
        if original_order:
            if self.perm_q is not None:
                dense = dense[:, :, torch.argsort(self.perm_q)]
            if self.perm_k is not None:
                dense = dense[:, :, :, torch.argsort(self.perm_k)]
        if dense.numel() <= 1 << 24:  # keep small expansions only; large ones would pin N x N memory on the layout
            if dense.is_inference():  # built under inference_mode: cache a plain copy that autograd can save
                with torch.inference_mode(False):
                    dense = dense.clone()
            self._cache[key] = dense
        return dense

    def transposed(self) -> dict:
        """Per (Bl, Hl, key block) sorted lists of query blocks for the dK/dV backward (built once, cached).

        Keys: ``full_counts, full_indices, partial_counts, partial_indices, partial_mask_ids``.
        """
        if "transposed" in self._cache:
            return self._cache["transposed"]
        out = {}
        nkb = self.num_k_blocks
        for kind in ("full", "partial"):
            cnt, idx = getattr(self, f"{kind}_counts"), getattr(self, f"{kind}_indices")
            valid = torch.arange(idx.shape[-1], device=self.device) < cnt.unsqueeze(-1)
            ent = valid.nonzero()
            b, h, qb, slot = ent.unbind(1)
            kb = idx[b, h, qb, slot].long()
            Bl, Hl, nqb = cnt.shape
            row = (b * Hl + h) * nkb + kb
            order = torch.argsort(row * nqb + qb)  # by (row, qb)
            row_s, qb_s = row[order], qb[order]
            counts = torch.bincount(row_s, minlength=Bl * Hl * nkb)
            width = max(int(counts.max()) if counts.numel() else 0, 1)
            start = torch.cumsum(counts, 0) - counts
            pos = torch.arange(row_s.numel(), device=self.device) - start[row_s]
            t_idx = torch.zeros(Bl * Hl * nkb, width, dtype=torch.int32, device=self.device)
            t_idx[row_s, pos] = qb_s.to(torch.int32)
            out[f"{kind}_counts"] = counts.view(Bl, Hl, nkb).to(torch.int32).contiguous()
            out[f"{kind}_indices"] = t_idx.view(Bl, Hl, nkb, width).contiguous()
            if kind == "partial":
                mids = torch.zeros(Bl * Hl * nkb, width, dtype=torch.int32, device=self.device)
                mids[row_s, pos] = self.partial_mask_ids[b, h, qb, slot][order]
                out["partial_mask_ids"] = mids.view(Bl, Hl, nkb, width).contiguous()
        self._cache["transposed"] = out
        return out

    def to_flex_block_mask(self):
        """This layout as a torch FlexAttention ``BlockMask`` in kernel order (FULL lists -> ``full_kv_*``,
        PARTIAL lists -> ``kv_*`` with a ``mask_mod`` reading ``mask_table``); see ``flex_backend.py``."""
        from .flex_backend import to_flex_block_mask
        return to_flex_block_mask(self)

    def to(self, device: Union[str, torch.device]) -> "BlockLayout":
        """Copy to another device (mask_mod kept)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockLayout(self.seq_len_q, self.seq_len_k, self.block_m, self.block_n,
                           mv(self.full_counts), mv(self.full_indices), mv(self.partial_counts),
                           mv(self.partial_indices), mv(self.partial_mask_ids), mv(self.mask_table),
                           mv(self.perm_q), mv(self.perm_k), self.mask_mod,
                           None if self.mask_factors is None else tuple(mv(t) for t in self.mask_factors))

    def __repr__(self) -> str:
        s = self.stats()
        return (f"BlockLayout(seq_lens=({self.seq_len_q}, {self.seq_len_k}), block=({self.block_m}, {self.block_n}), "
                f"rows={tuple(self.full_counts.shape)}, full={s['full']}, partial={s['partial']}, "
                f"empty={s['empty']}, density={s['density']:.3f}, permuted={s['permuted']})")


def _keep_all(b, h, q, k):
    return torch.ones((), dtype=torch.bool, device=q.device)
