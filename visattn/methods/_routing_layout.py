"""Bi-level routing attention: per-grid plans and the direct (host-sync-free) region-major BlockLayout.

A :class:`RoutingPlan` holds everything that depends only on (grid, regions, extra tokens, block, padding
mode, device): the kernel token order, the permutation in/out, the static class of every key block, the
bit-mask table, the lists of the extra-token rows and the launch facts of the Triton backend. It is built
once and cached (:func:`get_plan`). Per call, only the routing-dependent lists are computed, on the
routing's device, with no host synchronisation (no ``.item()``/``.tolist()``/``nonzero``/boolean
indexing, no Python loop over blocks): every width and count bound is known on the host from ``topk``.

Layouts made for the hot path are in *kernel order* with no ``perm_q``/``perm_k``: the plan permutes
q/k/v itself (a view + permute + one copy when the grid divides and there are no extra tokens, one
``index_select`` gather otherwise) and un-permutes the output.

Aligned path (the block divides the region size, so a key block belongs to one region or to the extra
tokens). Static key block classes: FULL; PARTIAL (a grid block holding masked padding cells, or the
ragged last block of the extra tokens; its element mask depends on the key block only); DEAD (a grid
block made only of masked padding). Query block rows:

* grid row of region ``a``: FULL = its routed regions' FULL blocks, then the extra blocks; PARTIAL = its
  routed regions' PARTIAL blocks, then the ragged extra block;
* extra-token row: every key block (static lists).

Packed path (several regions per block): FULL/PARTIAL/EMPTY come from per-block group counts; the lists
are built directly from that classification with *one* host sync (the list widths and the number of
PARTIAL entries), instead of the list -> dense -> list round trips of ``BlockLayout.from_indices``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

import torch

from ._cache import plain_tensors
import torch.nn.functional as F

from ..kernels.gather import MIN_TRITON_BYTES, permute_tokens
from ..kernels.layout import BlockLayout, block_lists, pack_bits
from . import _routing_core as core

__all__ = ["RoutingPlan", "get_plan", "direct_layout", "packed_layout", "reference_layout"]

_BIG = 1 << 30


def _pos_key(device) -> str:
    return str(torch.device(device))


def _big_cuda(x: torch.Tensor) -> bool:
    """A CUDA tensor large enough for the Triton token gather (kernels/gather.py) to beat a strided copy."""
    return x.is_cuda and 2 * x.numel() * x.element_size() >= MIN_TRITON_BYTES


@dataclass(eq=False)
class RoutingPlan:
    """Static facts and tensors of one (grid, regions, extras, block, mask_padding, device) combination."""

    order: "core.TokenOrder"   # on ``device``
    order_cpu: "core.TokenOrder"
    num_groups: int            # R = S*S
    region_tokens: int         # r = rh*rw (padding included)
    block: int                 # 0 for the dense path
    mask_padding: bool
    device: torch.device
    S: int
    rh: int
    rw: int
    view_perm: bool            # grid divides, no extra tokens: permutation by view + permute + one copy
    aligned: bool              # block divides the region size
    _per_batch: Dict = field(default_factory=dict, repr=False)
    _static: Dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------ sizes
    @property
    def num_work(self) -> int:
        return self.order.num_work

    @property
    def num_tokens(self) -> int:
        return self.order.num_tokens

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_work / self.block)

    @property
    def bpr(self) -> int:
        return self.region_tokens // self.block

    @property
    def grid_blocks(self) -> int:
        return self.num_groups * self.bpr

    # ------------------------------------------------------------------------------------ permutation
    def permute_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) in original order -> (B, H, Nw, D) in kernel order (padding cells are zero tokens)."""
        B, H, N, D = x.shape
        if self.view_perm and _big_cuda(x):  # one Triton gather (2.8 vs ~0.7 TB/s for the strided copy)
            return permute_tokens(x, self.order.perm, self.order.inv)
        if self.view_perm:
            S, rh, rw = self.S, self.rh, self.rw
            return x.reshape(B, H, S, rh, S, rw, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, N, D)
        if self.num_work > N:
            x = F.pad(x, (0, 0, 0, self.num_work - N))
        return x.index_select(2, self.order.perm)

    def permute_out(self, o: torch.Tensor) -> torch.Tensor:
        """(B, H, Nw, D) in kernel order -> (B, H, N, D) in original order (padding cells dropped)."""
        B, H, _, D = o.shape
        if self.view_perm and _big_cuda(o):
            return permute_tokens(o, self.order.inv, self.order.perm)
        if self.view_perm:
            S, rh, rw = self.S, self.rh, self.rw
            return o.reshape(B, H, S, S, rh, rw, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, self.num_tokens, D)
        return o.index_select(2, self._inv_n())

    def _inv_n(self) -> torch.Tensor:
        if "inv_n" not in self._static:
            with torch.inference_mode(False):  # cached: plain tensors (see _cache.py)
                self._static["inv_n"] = self.order.inv[:self.num_tokens].contiguous()
        return self._static["inv_n"]

    # ------------------------------------------------------------------------------------ static key blocks
    def key_classes(self) -> torch.Tensor:
        """CPU int64 (nb,): 2 FULL, 1 PARTIAL (masked padding or ragged tail), 0 DEAD (masked padding only)."""
        if "kcls_cpu" not in self._static:
            self._build_static()
        return self._static["kcls_cpu"]

    @plain_tensors
    def _build_static(self) -> None:
        o, bs, nb, nw = self.order_cpu, self.block, self.num_blocks, self.num_work
        kpos = torch.arange(nb * bs)
        valid = kpos < nw
        if self.mask_padding:
            valid[:nw] &= ~o.pad_w[o.perm]
        vb = valid.view(nb, bs)
        nvalid = vb.sum(-1)
        kcls = torch.where(nvalid == bs, 2, torch.where(nvalid == 0, 0, 1))
        part = (kcls == 1).nonzero().flatten()  # plan build, once per grid: host work is fine here
        mid = torch.zeros(nb, dtype=torch.long)
        mid[part] = torch.arange(part.numel())
        if part.numel():
            rows = pack_bits(vb[part])  # (M, words): the element mask of a PARTIAL key block, same for every row
            table = rows[:, None, :].expand(-1, bs, -1).contiguous()
        else:
            table = torch.zeros(1, bs, (bs + 31) // 32, dtype=torch.int32)
        st = self._static
        st["kcls_cpu"] = kcls
        st["kcls"] = kcls.to(self.device)
        st["mid_cpu"] = mid.to(torch.int32)
        st["mid"] = st["mid_cpu"].to(self.device)
        st["table"] = table.to(self.device)
        st["has_partial"] = bool(part.numel())
        st["has_dead"] = bool((kcls == 0).any())  # padding-only key blocks (mask_padding): no work in dK/dV
        Gb = self.grid_blocks
        st["simple"] = bool((kcls[:Gb] == 2).all())  # no grid key block is PARTIAL or DEAD
        st["extra_blocks"] = torch.arange(Gb, nb)

    # ------------------------------------------------------------------------------------ per-batch statics
    def _batch_static(self, B: int, topk: int) -> dict:
        key = (B, topk)
        if key in self._per_batch:
            return self._per_batch[key]
        return self._build_batch_static(B, topk)

    @plain_tensors
    def _build_batch_static(self, B: int, topk: int) -> dict:
        key = (B, topk)
        self.key_classes()
        st = self._static
        dev = self.device
        kcls = st["kcls_cpu"]
        nb, Gb, bpr = self.num_blocks, self.grid_blocks, self.bpr
        T = topk * bpr
        xb = st["extra_blocks"]                       # (Xb,) CPU
        xf, xp = xb[kcls[xb] == 2], xb[kcls[xb] == 1]
        allk = torch.arange(nb)
        erow_f, erow_p = allk[kcls == 2], allk[kcls == 1]   # extra-token rows: every key block
        # widths (host-known bounds): grid rows hold at most T routed + the extra blocks
        if st["simple"]:
            wf_grid, wp_grid = T + xf.numel(), xp.numel()
        else:
            wf_grid, wp_grid = T + xf.numel(), T + xp.numel()
        Xb = nb - Gb
        WF = max(1, wf_grid, erow_f.numel() if Xb else 0)
        WP = max(1, wp_grid, erow_p.numel() if Xb else 0)
        f_tmpl = torch.zeros(nb, WF, dtype=torch.int32)
        p_tmpl = torch.zeros(nb, WP, dtype=torch.int32)
        f_cnt = torch.zeros(nb, dtype=torch.int32)
        p_cnt = torch.zeros(nb, dtype=torch.int32)
        p_mid = torch.zeros(nb, WP, dtype=torch.int32)
        mid_cpu = st["mid_cpu"]
        if Xb:
            f_tmpl[Gb:, :erow_f.numel()] = erow_f.to(torch.int32)
            p_tmpl[Gb:, :erow_p.numel()] = erow_p.to(torch.int32)
            f_cnt[Gb:] = erow_f.numel()
            p_cnt[Gb:] = erow_p.numel()
            p_mid[Gb:, :erow_p.numel()] = mid_cpu[erow_p]
        if st["simple"]:  # grid rows: [routed (T, filled per call), extra FULL]; PARTIAL = [ragged extra]
            f_tmpl[:Gb, T:T + xf.numel()] = xf.to(torch.int32)
            f_cnt[:Gb] = T + xf.numel()
            p_tmpl[:Gb, :xp.numel()] = xp.to(torch.int32)
            p_cnt[:Gb] = xp.numel()
            p_mid[:Gb, :xp.numel()] = mid_cpu[xp]
        # static row lengths -> the Triton launch facts (HAS_FULL / HAS_PARTIAL / mean row / longest-first order)
        row_len = torch.empty(nb, dtype=torch.float64)
        row_len[:Gb] = T + xb.numel()
        row_len[Gb:] = erow_f.numel() + erow_p.numel()
        order = None
        if row_len.numel() and float(row_len.max()) > _reorder_ratio() * max(float(row_len.mean()), 1e-9):
            order = torch.argsort(row_len, descending=True, stable=True).to(torch.int32)
            order = order.view(1, 1, nb).expand(B, 1, nb).contiguous().to(dev)

        def bexp(t):
            return t.unsqueeze(0).expand(B, *t.shape).unsqueeze(1).contiguous().to(dev)

        out = {
            "T": T, "WF": WF, "WP": WP, "f_tmpl": bexp(f_tmpl), "p_tmpl": bexp(p_tmpl), "f_cnt": bexp(f_cnt),
            "p_cnt": bexp(p_cnt), "p_mid": bexp(p_mid), "order": order,
            "info": {"HAS_FULL": True, "HAS_PARTIAL": st["has_partial"],
                     "mean_row": float(row_len.mean()) if nb else 0.0},
            "ar_bpr": torch.arange(bpr, device=dev),
            "xb": xb.to(dev), "ar_nb": torch.arange(nb, device=dev),
            "ar_nb32": torch.arange(nb, device=dev, dtype=torch.int32),
            "t_zeros": torch.zeros(B, 1, nb, 1, dtype=torch.int32, device=dev),
            "t_zero_counts": torch.zeros(B, 1, nb, dtype=torch.int32, device=dev),
        }
        if len(self._per_batch) > 16:
            self._per_batch.pop(next(iter(self._per_batch)))
        self._per_batch[key] = out
        return out


def _reorder_ratio() -> float:
    try:
        from ..kernels.triton_backend import REORDER_RATIO
        return float(REORDER_RATIO)
    except Exception:  # triton not importable: the value only matters for the Triton launch facts
        return 1.25


_PLANS: Dict[Tuple, RoutingPlan] = {}


def get_plan(grid: "core.RegionGrid", spatial_start: int, seq_len: int, block: int, *, mask_padding: bool,
             device) -> RoutingPlan:
    """Cached :class:`RoutingPlan` for ``grid`` at ``spatial_start`` in a sequence of ``seq_len`` tokens
    (``block`` 0: the dense path, which only uses the token order)."""
    dev = torch.device(device)
    key = (grid.height, grid.width, grid.num_regions, spatial_start, seq_len, block, bool(mask_padding), _pos_key(dev))
    plan = _PLANS.get(key)
    if plan is None:  # (the plan's tensors are built lazily, outside inference mode, by its own methods)
        order = core.token_order(grid, spatial_start, seq_len, dev)
        order_cpu = core._token_order_cpu(grid.height, grid.width, grid.num_regions, spatial_start, seq_len)
        R = grid.num_region_total
        r = grid.region_size
        extras = order.num_work - order.num_grid
        plan = RoutingPlan(order=order, order_cpu=order_cpu, num_groups=R, region_tokens=r, block=block, mask_padding=bool(mask_padding),
                           device=dev, S=grid.num_regions, rh=grid.rh, rw=grid.rw,
                           view_perm=(grid.num_pad == 0 and extras == 0),
                           aligned=bool(block) and r % block == 0)
        _PLANS[key] = plan
        if len(_PLANS) > 64:
            _PLANS.pop(next(iter(_PLANS)))
    return plan


# ---------------------------------------------------------------------------------------------- aligned path
def direct_layout(plan: RoutingPlan, routing: torch.Tensor) -> BlockLayout:
    """Aligned-path layout (batch dim B, head dim 1, kernel order, no permutation) with no host sync."""
    assert plan.aligned, "direct_layout needs a block that divides the region size"
    B, R, topk = routing.shape
    bs = plan._batch_static(B, topk)
    st = plan._static
    nb, Gb, bpr, T = plan.num_blocks, plan.grid_blocks, plan.bpr, bs["T"]
    # routed key blocks of each region, ascending: region c -> blocks c*bpr .. c*bpr + bpr - 1
    kb = routing.sort(-1).values
    if bpr > 1:
        kb = (kb.unsqueeze(-1) * bpr + bs["ar_bpr"]).reshape(B, R, T)
    if st["simple"]:
        routed = kb.to(torch.int32)
        if bpr > 1:
            routed = routed.repeat_interleave(bpr, dim=1)
        if Gb == nb and bs["WF"] == T:  # no extra tokens: the lists are the routed blocks themselves
            f_idx = routed.unsqueeze(1)
            if not f_idx.is_contiguous():
                f_idx = f_idx.contiguous()
        else:
            f_idx = bs["f_tmpl"].clone()
            f_idx[:, 0, :Gb, :T] = routed
        layout = BlockLayout(plan.num_work, plan.num_work, plan.block, plan.block, bs["f_cnt"], f_idx, bs["p_cnt"],
                             bs["p_tmpl"], bs["p_mid"], st["table"], None, None, None)
    else:
        layout = _direct_general(plan, kb, bs)
    layout._cache["triton_info"] = bs["info"]
    layout._cache["triton_order"] = bs["order"]
    layout._cache["routing_plan"] = plan
    layout._cache["routing"] = routing
    return layout


def _direct_general(plan: RoutingPlan, kb: torch.Tensor, bs: dict) -> BlockLayout:
    """Grid key blocks can be PARTIAL (masked padding) or DEAD: split the routed blocks by their static class."""
    st = plan._static
    B, R, T = kb.shape
    Gb, bpr = plan.grid_blocks, plan.bpr
    kcls = st["kcls"]
    xb = bs["xb"]
    cand = torch.cat([kb, xb.view(1, 1, -1).expand(B, R, -1)], dim=-1) if xb.numel() else kb  # ascending
    cls = kcls[cand]
    out = []
    for want, W in ((2, bs["WF"]), (1, bs["WP"])):
        sel = cls == want
        keyed = torch.where(sel, cand, _BIG).sort(-1).values
        cnt = sel.sum(-1, dtype=torch.int32)
        lst = torch.where(keyed < _BIG, keyed, 0).to(torch.int32)
        if lst.shape[-1] < W:
            lst = F.pad(lst, (0, W - lst.shape[-1]))
        else:
            lst = lst[..., :W]
        if bpr > 1:
            lst, cnt = lst.repeat_interleave(bpr, dim=1), cnt.repeat_interleave(bpr, dim=1)
        out.append((lst, cnt))
    (f_l, f_c), (p_l, p_c) = out
    f_idx, p_idx = bs["f_tmpl"].clone(), bs["p_tmpl"].clone()
    f_cnt, p_cnt = bs["f_cnt"].clone(), bs["p_cnt"].clone()
    f_idx[:, 0, :Gb] = f_l
    p_idx[:, 0, :Gb] = p_l
    f_cnt[:, 0, :Gb] = f_c
    p_cnt[:, 0, :Gb] = p_c
    p_mid = bs["p_mid"].clone()
    valid = torch.arange(p_l.shape[-1], device=kb.device) < p_c.unsqueeze(-1)
    p_mid[:, 0, :Gb] = torch.where(valid, st["mid"][p_l.long()], 0)
    return BlockLayout(plan.num_work, plan.num_work, plan.block, plan.block, f_cnt, f_idx, p_cnt, p_idx, p_mid,
                       st["table"], None, None, None)


def direct_transposed(plan: RoutingPlan, routing: torch.Tensor):
    """Per key block sorted query-block lists (the dK/dV backward's ``BlockLayout.transposed()``), no host sync.

    Grid key block of region c: the query blocks of every region that routes to c, then the extra-token
    query blocks; extra key blocks: every query block. FULL or PARTIAL by the key block's static class.
    Widths are the static bound nb (all query blocks). Returns (lists dict, longest-first row order).
    """
    B, R, topk = routing.shape
    bs = plan._batch_static(B, topk)
    st = plan._static
    nb, Gb, bpr = plan.num_blocks, plan.grid_blocks, plan.bpr
    dev = routing.device
    allow = torch.zeros(B, R, R, dtype=torch.bool, device=dev)
    allow.scatter_(-1, routing, True)             # [b, a, c]: region a routes to c
    sel = allow.transpose(1, 2)                   # [b, c, a]
    if bpr > 1:
        sel = sel.repeat_interleave(bpr, dim=-1)  # [b, c, query block]
    if nb > Gb:
        sel = torch.cat([sel, sel.new_ones(B, R, nb - Gb)], dim=-1)
    # selected query blocks first, ascending; the rest sort to the end as nb, and nb % nb = 0 is the padding
    lst = torch.where(sel, bs["ar_nb32"], nb).sort(-1).values.remainder_(nb)
    cnt = sel.sum(-1, dtype=torch.int32)
    if bpr > 1:
        lst, cnt = lst.repeat_interleave(bpr, dim=1), cnt.repeat_interleave(bpr, dim=1)
    if nb > Gb:  # extra key blocks: every query block
        lst = torch.cat([lst, bs["ar_nb32"].expand(B, nb - Gb, nb)], dim=1)
        cnt = torch.cat([cnt, cnt.new_full((B, nb - Gb), nb)], dim=1)
    out = {}
    if st["has_partial"]:
        kcls = st["kcls"]
        f_cnt = torch.where(kcls == 2, cnt, 0).to(torch.int32)
        p_cnt = torch.where(kcls == 1, cnt, 0).to(torch.int32)
        slots = bs["ar_nb"]
        p_valid = slots < p_cnt.unsqueeze(-1)
        out["partial_indices"] = torch.where(p_valid, lst, 0).unsqueeze(1)
        out["partial_counts"] = p_cnt.unsqueeze(1)
        out["partial_mask_ids"] = torch.where(p_valid, st["mid"].view(1, nb, 1), 0).to(torch.int32).unsqueeze(1)
        out["full_indices"] = torch.where(slots < f_cnt.unsqueeze(-1), lst, 0).unsqueeze(1)
        out["full_counts"] = f_cnt.unsqueeze(1)
    else:  # every key block is FULL, or padding only (those get no rows)
        if st["has_dead"]:
            cnt = torch.where(st["kcls"] != 0, cnt, 0).to(torch.int32)
            lst = torch.where(bs["ar_nb"] < cnt.unsqueeze(-1), lst, 0)
        out["partial_indices"] = out["partial_mask_ids"] = bs["t_zeros"]
        out["partial_counts"] = bs["t_zero_counts"]
        out["full_indices"] = lst.unsqueeze(1)
        out["full_counts"] = cnt.unsqueeze(1)
    order = torch.argsort(out["full_counts"] + out["partial_counts"] if st["has_partial"] else out["full_counts"],
                          dim=-1, descending=True, stable=True).to(torch.int32)
    return {k: v.contiguous() for k, v in out.items()}, order


def attach_backward_lists(layout: BlockLayout, plan: RoutingPlan, routing: torch.Tensor) -> None:
    """Fill ``layout.transposed()`` and the backward launch order from the routing (no host sync)."""
    t, order = direct_transposed(plan, routing)
    layout._cache["transposed"] = t
    layout._cache["triton_order_t"] = order  # longest key-block rows first (routing popularity is uneven)


# ---------------------------------------------------------------------------------------------- packed path
def packed_layout(plan: RoutingPlan, routing: torch.Tensor) -> BlockLayout:
    """Packed-path layout in kernel order, built from the block classification with one host sync."""
    o, bsz = plan.order, plan.block
    dev = routing.device
    nw, nb = plan.num_work, plan.num_blocks
    full, partial, allow, kvalid = _classify(plan, routing)
    f_cnt = full.sum(-1, dtype=torch.int32)
    p_cnt = partial.sum(-1, dtype=torch.int32)
    tot = f_cnt + p_cnt
    fmax, pmax, psum, fsum, tmax = torch.stack([f_cnt.max(), p_cnt.max(), p_cnt.sum(), f_cnt.sum(),
                                                tot.max()]).tolist()  # the one host sync of this path
    f_idx = _lists(full, max(fmax, 1))
    p_idx = _lists(partial, max(pmax, 1))
    P = p_idx.shape[-1]
    valid = torch.arange(P, device=dev) < p_cnt.unsqueeze(-1)   # (B, 1, nb, P)
    flat = valid.flatten()
    rank = flat.cumsum(0) - 1
    mask_ids = torch.where(valid, rank.view(valid.shape), 0).to(torch.int32).contiguous()
    words = (bsz + 31) // 32
    if psum == 0:
        table = torch.zeros(1, bsz, words, dtype=torch.int32, device=dev)
    else:
        slot = torch.empty(psum + 1, dtype=torch.long, device=dev)
        slot.scatter_(0, torch.where(flat, rank, psum), torch.arange(flat.numel(), device=dev))
        slot = slot[:psum]
        b = slot // (nb * P)
        qb = (slot // P) % nb
        kb = p_idx.flatten()[slot].long()
        gk = o.group_k
        chunks = []
        step = max(1, (1 << 22) // (bsz * bsz))
        ar = torch.arange(bsz, device=dev)
        for e0 in range(0, psum, step):  # host-known count: no sync
            sl = slice(e0, e0 + step)
            qpos = (qb[sl, None] * bsz + ar).clamp_max(nw - 1)
            kpos = kb[sl, None] * bsz + ar
            kin = kpos < nw
            kpos = kpos.clamp_max(nw - 1)
            m = allow[b[sl, None, None], gk[qpos][:, :, None], gk[kpos][:, None, :]]
            m = m & (kin & kvalid[kpos])[:, None, :]
            chunks.append(pack_bits(m))
        table = torch.cat(chunks).contiguous()
    layout = BlockLayout(nw, nw, bsz, bsz, f_cnt.contiguous(), f_idx, p_cnt.contiguous(), p_idx, mask_ids, table,
                         None, None, None)
    rows = max(f_cnt.numel(), 1)
    layout._cache["triton_info"] = {"HAS_FULL": fsum > 0, "HAS_PARTIAL": psum > 0, "mean_row": (fsum + psum) / rows}
    mean = (fsum + psum) / rows
    layout._cache["triton_order"] = (torch.argsort(tot, dim=-1, descending=True, stable=True).to(torch.int32)
                                     .contiguous() if tmax > _reorder_ratio() * max(mean, 1e-9) else None)
    layout._cache["routing_plan"] = plan
    layout._cache["routing"] = routing
    return layout


def _lists(valid: torch.Tensor, width: int) -> torch.Tensor:
    """Sorted int32 index lists of a bool selection (..., nKB), ``width`` known on the host (no sync)."""
    nkb = valid.shape[-1]
    ar = torch.arange(nkb, device=valid.device)
    key = torch.where(valid, ar, ar + nkb).sort(-1).values[..., :width]
    idx = torch.where(key < nkb, key, 0)
    if idx.shape[-1] < width:
        idx = F.pad(idx, (0, width - idx.shape[-1]))
    return idx.to(torch.int32).contiguous()


def _classify(plan: RoutingPlan, routing: torch.Tensor):
    """FULL / PARTIAL block classes (B, 1, nb, nb) from per-block group counts (kernel order)."""
    o, bsz = plan.order, plan.block
    dev = routing.device
    B = routing.shape[0]
    R = plan.num_groups
    G = R + 1
    nw, nb = plan.num_work, plan.num_blocks
    allow = torch.zeros(B, G, G, dtype=torch.bool, device=dev)
    allow[:, :R].scatter_(-1, routing, True)
    allow[:, :, R] = True
    allow[:, R, :] = True
    st = plan._static
    if "cq" not in st:
        pos = torch.arange(nw, device=dev)
        blk = pos // bsz
        cq = torch.zeros(nb, G, device=dev, dtype=torch.float32)
        cq.index_put_((blk, o.group_k), torch.ones(nw, device=dev), accumulate=True)
        kvalid = torch.ones(nw, dtype=torch.bool, device=dev)
        if plan.mask_padding:
            kvalid = ~o.pad_w[o.perm]
        ck = torch.zeros(nb, G, device=dev, dtype=torch.float32)
        ck.index_put_((blk, o.group_k), kvalid.float(), accumulate=True)
        total = (cq.sum(-1) * bsz).view(nb, 1)
        kfull_ok = (torch.arange(nb, device=dev) * bsz + bsz <= nw).view(1, 1, nb)  # ragged last key block
        st.update(cq=cq, ckt=ck.t().contiguous(), total=total, kfull_ok=kfull_ok, kvalid=kvalid)
    kept = torch.matmul(torch.matmul(st["cq"], allow.float()), st["ckt"])  # (B, nb, nb): exact integers in fp32
    full = (kept == st["total"]) & st["kfull_ok"]
    partial = (kept > 0) & ~full
    return full.unsqueeze(1), partial.unsqueeze(1), allow, st["kvalid"]


# ---------------------------------------------------------------------------------------------- reference
def reference_layout(routing: torch.Tensor, order, num_groups: int, block: int, *,
                     mask_padding: bool) -> BlockLayout:
    """The generic construction through ``BlockLayout.from_indices`` (host syncs; tests compare against it)."""
    dev = routing.device
    G = num_groups + 1
    nw = order.num_work
    nb = math.ceil(nw / block)
    allow = torch.zeros(routing.shape[0], G, G, dtype=torch.bool, device=dev)
    allow[:, :num_groups].scatter_(-1, routing, True)
    allow[:, :, num_groups] = True
    allow[:, num_groups, :] = True
    pos = torch.arange(nw, device=dev)
    blk = pos // block
    cq = torch.zeros(nb, G, device=dev, dtype=torch.float32)
    cq.index_put_((blk, order.group_k), torch.ones(nw, device=dev), accumulate=True)
    kvalid = torch.ones(nw, dtype=torch.bool, device=dev)
    if mask_padding:
        kvalid = ~order.pad_w[order.perm]
    ck = torch.zeros(nb, G, device=dev, dtype=torch.float32)
    ck.index_put_((blk, order.group_k), kvalid.float(), accumulate=True)
    kept = torch.matmul(torch.matmul(cq, allow.float()), ck.t())
    total = cq.sum(-1).view(nb, 1) * block
    full = kept == total
    full &= (torch.arange(nb, device=dev) * block + block <= nw).view(1, 1, nb)
    partial = (kept > 0) & ~full
    full, partial = full.unsqueeze(1), partial.unsqueeze(1)
    f_idx, f_cnt = block_lists(full)
    p_idx, p_cnt = block_lists(partial)
    has_partial = bool(p_cnt.any())
    group_w, pad_w = order.group_w, order.pad_w

    def mask_mod(b, h, qi, ki):  # original (working) positions
        keep = allow[b, group_w[qi], group_w[ki]]
        return keep & ~pad_w[ki] if mask_padding else keep
    return BlockLayout.from_indices(f_idx, f_cnt, block_size=block, seq_lens=nw,
                                    partial_indices=p_idx if has_partial else None,
                                    partial_counts=p_cnt if has_partial else None,
                                    mask_mod=mask_mod if has_partial else None,
                                    perm_q=order.perm, perm_k=order.perm)


def with_permutation(layout: BlockLayout, plan: RoutingPlan, routing: torch.Tensor) -> BlockLayout:
    """The kernel-order layout with ``perm_q = perm_k = order.perm`` and an original-position ``mask_mod``
    (the :class:`BlockLayout` contract for callers that permute through the dispatcher)."""
    o = plan.order
    R = plan.num_groups
    allow = torch.zeros(routing.shape[0], R + 1, R + 1, dtype=torch.bool, device=routing.device)
    allow[:, :R].scatter_(-1, routing, True)
    allow[:, :, R] = True
    allow[:, R, :] = True
    group_w, pad_w, mp = o.group_w, o.pad_w, plan.mask_padding

    def mask_mod(b, h, qi, ki):
        keep = allow[b, group_w[qi], group_w[ki]]
        return keep & ~pad_w[ki] if mp else keep
    out = replace(layout, perm_q=o.perm, perm_k=o.perm, mask_mod=mask_mod)
    out._cache = dict(layout._cache)
    out._cache["inv_q"] = o.inv
    for k in ("dense", True), ("dense", False), "flex_ids", "flex_block_mask", "xformers_plan":
        out._cache.pop(k, None)
    return out
