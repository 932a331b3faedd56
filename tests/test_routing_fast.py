"""Bi-level routing fast path: direct layouts equal the generic construction, no host syncs, plan caching,
the view permutation, and the small-problem dense fallback."""
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from visattn.functional import bilevel_routing_attention as bra
from visattn.kernels import available_backends
from visattn.kernels.layout import unpack_bits
from visattn.methods import BiLevelRouting
from visattn.methods import _routing_core as core
from visattn.methods import _routing_layout as rl
from visattn import TokenGeometry

from _routing_ref import spec_reference

F64 = dict(atol=1e-10, rtol=0)


def _random_routing(B, R, topk, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(R, generator=g)[:topk] for _ in range(R)]) for _ in range(B)])


def _assert_lists_equal(a_idx, a_cnt, b_idx, b_cnt, what):
    assert torch.equal(a_cnt.long(), b_cnt.long()), f"{what}: counts differ"
    width = int(b_cnt.max()) if b_cnt.numel() else 0
    assert a_idx.shape[-1] >= width and b_idx.shape[-1] >= width, what
    valid = torch.arange(width) < b_cnt.long().unsqueeze(-1)
    a = torch.where(valid, a_idx[..., :width].long(), -1)
    b = torch.where(valid, b_idx[..., :width].long(), -1)
    assert torch.equal(a, b), f"{what}: lists differ"
    # entries past the count are padding (0), as the BlockLayout contract says
    rest = torch.arange(a_idx.shape[-1]) >= a_cnt.long().unsqueeze(-1)
    assert not bool((a_idx.long() * rest).any()), f"{what}: non-zero padding"


def _assert_entry_masks_equal(table_a, mids_a, table_b, mids_b, counts, block, what):
    width = int(counts.max()) if counts.numel() else 0
    if not width:
        return
    valid = torch.arange(width) < counts.long().unsqueeze(-1)
    a = unpack_bits(table_a[mids_a[..., :width][valid].long()], block)
    b = unpack_bits(table_b[mids_b[..., :width][valid].long()], block)
    assert torch.equal(a, b), what


# (grid, regions, topk, tokens before the grid, tokens after it)
CASES = [
    ((32, 32), 4, 5, 0, 0),    # aligned, block 64, one block per region
    ((16, 32), 4, 5, 0, 0),    # aligned, regions of 32 -> block 32
    ((32, 32), 2, 3, 0, 0),    # regions of 256 -> block 128, 2 blocks per region
    ((30, 30), 4, 3, 0, 0),    # non-divisible grid (padding cells), aligned
    ((61, 59), 4, 5, 0, 0),    # non-divisible, 16x15 regions: block 16, padding-only (DEAD) blocks when masked
    ((7, 8), 2, 2, 0, 0),      # 4x4 regions with a padded row
    ((8, 8), 2, 1, 1, 0),      # CLS token: ragged extra block
    ((8, 8), 2, 2, 1, 3),      # prefix + suffix
    ((7, 8), 2, 3, 2, 5),      # extras and padding
    ((8, 8), 2, 2, 0, 16),     # extras filling a whole block (no ragged tail)
    ((15, 15), 5, 3, 0, 0),    # 3x3 regions -> packed
    ((9, 9), 3, 2, 0, 0),      # packed
    ((10, 9), 3, 4, 1, 2),     # packed with padding and extras
    ((14, 14), 7, 4, 1, 0),    # packed (2x2 regions) with a CLS token
    ((29, 32), 2, 2, 0, 0),    # padding-only key blocks and no PARTIAL one (mask_padding)
]


@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize("hw,S,topk,prefix,suffix", CASES)
def test_direct_layout_equals_from_indices_construction(hw, S, topk, prefix, suffix, mask_padding):
    grid = core.make_region_grid(hw, S)
    N = prefix + hw[0] * hw[1] + suffix
    order = core.token_order(grid, prefix, N, "cpu")
    path, block = core.choose_strategy(grid, order.num_work)
    if path == "dense":
        path, block = core.choose_strategy(grid, order.num_work, "packed")
    R = grid.num_region_total
    routing = _random_routing(2, R, topk, seed=N + S)
    fast = core.build_layout(routing, order, R, block, mask_padding=mask_padding)
    ref = rl.reference_layout(routing, order, R, block, mask_padding=mask_padding)
    plan = rl.get_plan(grid, prefix, N, block, mask_padding=mask_padding, device="cpu")
    assert plan.aligned == (path == "aligned")
    assert torch.equal(fast.perm_q, ref.perm_q) and torch.equal(fast.perm_k, ref.perm_k)
    _assert_lists_equal(fast.full_indices, fast.full_counts, ref.full_indices, ref.full_counts, "full")
    _assert_lists_equal(fast.partial_indices, fast.partial_counts, ref.partial_indices, ref.partial_counts, "partial")
    _assert_entry_masks_equal(fast.mask_table, fast.partial_mask_ids, ref.mask_table, ref.partial_mask_ids,
                              ref.partial_counts, block, "partial masks")
    dense = core.dense_mask(routing, order, R, mask_padding=mask_padding)
    assert torch.equal(fast.to_dense(), ref.to_dense()) and torch.equal(fast.to_dense(), dense)
    if plan.aligned:  # the dK/dV lists of the backward, built directly
        t, _ = rl.direct_transposed(plan, routing)
        rt = ref.transposed()
        _assert_lists_equal(t["full_indices"], t["full_counts"], rt["full_indices"], rt["full_counts"], "full^T")
        _assert_lists_equal(t["partial_indices"], t["partial_counts"], rt["partial_indices"], rt["partial_counts"],
                            "partial^T")
        _assert_entry_masks_equal(fast.mask_table, t["partial_mask_ids"], ref.mask_table, rt["partial_mask_ids"],
                                  rt["partial_counts"], block, "partial^T masks")


def test_aligned_lists_are_the_sorted_routing():
    """No extras, divisible grid: FULL lists = sorted top-k regions per query block, count = topk."""
    grid = core.make_region_grid((32, 32), 4)
    order = core.token_order(grid, 0, 1024, "cpu")
    routing = _random_routing(2, 16, 5, seed=3)
    lay = core.build_layout(routing, order, 16, 64, mask_padding=False, with_perm=False)
    assert lay.perm_q is None and lay.full_indices.shape == (2, 1, 16, 5)
    assert torch.equal(lay.full_indices[:, 0].long(), routing.sort(-1).values)
    assert bool((lay.full_counts == 5).all()) and not bool(lay.partial_counts.any())


# ------------------------------------------------------------------------------------------------ host syncs
_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "nonzero_numpy", "masked_select", "_unique2", "unique_dim",
             "unique_consecutive", "bincount", "equal", "is_nonzero", "allclose"}


class _SyncSpy(TorchDispatchMode):
    """Records every aten op that makes the host wait for the device on CUDA: scalar reads, data-dependent
    output sizes, boolean-mask indexing, and copies between devices (e.g. a per-call CPU -> GPU upload)."""

    def __init__(self):
        super().__init__()
        self.bad = []
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.count += 1
        if name in _SYNC_OPS:
            self.bad.append(str(func))
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1]):
                self.bad.append(f"{func} with a boolean index")
        if name in ("_to_copy", "copy_"):
            devs = {t.device.type for t in args if isinstance(t, torch.Tensor)}
            if kwargs.get("device") is not None:
                devs.add(torch.device(kwargs["device"]).type)
            if len(devs) > 1:
                self.bad.append(f"{func} across devices {sorted(devs)}")
        return func(*args, **kwargs)


class _NoKernel:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches nothing (host path only)."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


@pytest.fixture
def host_only_triton(monkeypatch):
    """The Triton backend's host path (launch facts, orders, backward lists) with the launches stubbed out,
    accepting CPU and meta tensors."""
    tb = pytest.importorskip("visattn.kernels.triton_backend")
    from visattn.kernels.dispatch import BACKENDS, _load_optional_backends
    _load_optional_backends()
    if "triton" not in BACKENDS:
        pytest.skip("triton backend not registered")
    kernels = {n: _NoKernel() for n in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")}
    for n, k in kernels.items():
        monkeypatch.setattr(tb, n, k)
    monkeypatch.setattr(tb, "_probe", lambda q, layout, needs_grad: None)
    monkeypatch.setattr(BACKENDS["triton"], "probe", lambda q, layout, needs_grad: None)
    monkeypatch.setattr(tb, "_tma_ok", lambda t: False)
    return kernels


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("hw,S,topk,B,hk,mask_padding", [
    ((32, 32), 4, 5, 2, 2, False),   # the benchmark layout family: view permutation, block 64
    ((16, 32), 4, 3, 1, 1, False),   # 2 blocks per region, GQA (1 kv head for 2 query heads)
    ((30, 30), 4, 3, 1, 2, True),    # padded grid, masked padding: PARTIAL grid blocks, gather permutation
    ((30, 30), 4, 3, 2, 2, False),   # padded grid, legacy padding
])
def test_aligned_path_has_no_host_sync(host_only_triton, device, hw, S, topk, B, hk, mask_padding):
    """Routing, layout, permutation, Triton launch preparation and the backward lists: no op that would make
    the host wait for the GPU. On 'meta' tensors any scalar read / data-dependent size raises by itself."""
    N = hw[0] * hw[1]
    q = torch.randn(B, 2, N, 16, device=device, requires_grad=True)
    k, v = (torch.randn(B, hk, N, 16, device=device, requires_grad=True) for _ in range(2))
    kw = dict(spatial_shape=hw, num_regions=S, topk=topk, backend="triton", mask_padding=mask_padding)
    bra(q, k, v, **kw).sum().backward()  # first call: builds the cached plan (host work allowed there)
    spy = _SyncSpy()
    with spy:
        out = bra(q, k, v, **kw)
        out.sum().backward()
    assert spy.bad == [], spy.bad
    assert host_only_triton["_fwd_kernel"].launches == 2 and host_only_triton["_bwd_dkdv_kernel"].launches == 2
    assert spy.count < 400  # a few dozen small ops per call, not a loop over blocks


def test_sync_spy_sees_the_generic_construction():
    """The spy is not blind: the from_indices construction syncs."""
    grid = core.make_region_grid((32, 32), 4)
    order = core.token_order(grid, 0, 1024, "cpu")
    routing = _random_routing(1, 16, 5, seed=1)
    spy = _SyncSpy()
    with spy:
        rl.reference_layout(routing, order, 16, 64, mask_padding=False)
    assert any("_local_scalar_dense" in b for b in spy.bad) and any("nonzero" in b for b in spy.bad)


# ------------------------------------------------------------------------------------------------ caching
def test_plan_and_statics_are_cached():
    grid = core.make_region_grid((30, 30), 4)
    p1 = rl.get_plan(grid, 0, 900, 64, mask_padding=True, device="cpu")
    p2 = rl.get_plan(grid, 0, 900, 64, mask_padding=True, device="cpu")
    assert p1 is p2 and p1.order is core.token_order(grid, 0, 900, "cpu")
    assert rl.get_plan(grid, 0, 900, 64, mask_padding=False, device="cpu") is not p1
    r = _random_routing(1, 16, 3, seed=0)
    a, b = rl.direct_layout(p1, r), rl.direct_layout(p1, r)
    assert a.mask_table is b.mask_table and a.partial_mask_ids is not None
    assert core.region_valid_counts(grid, "cpu") is core.region_valid_counts(grid, "cpu")


# ------------------------------------------------------------------------------------------------ permutation
@pytest.mark.parametrize("hw,S,prefix,suffix", [((32, 32), 4, 0, 0), ((16, 32), 4, 0, 0), ((30, 30), 4, 0, 0),
                                                 ((8, 8), 2, 1, 2)])
def test_permutation_view_equals_gather(hw, S, prefix, suffix):
    grid = core.make_region_grid(hw, S)
    N = prefix + hw[0] * hw[1] + suffix
    order = core.token_order(grid, prefix, N, "cpu")
    plan = rl.get_plan(grid, prefix, N, core.choose_strategy(grid, order.num_work)[1], mask_padding=False,
                       device="cpu")
    assert plan.view_perm == (grid.num_pad == 0 and prefix + suffix == 0)
    x = torch.randn(2, 3, N, 8)
    xw = torch.cat([x, x.new_zeros(2, 3, order.num_work - N, 8)], 2)
    assert torch.equal(plan.permute_in(x), xw.index_select(2, order.perm))
    y = torch.randn(2, 3, order.num_work, 8)
    assert torch.equal(plan.permute_out(y), y.index_select(2, order.inv)[:, :, :N])


# ------------------------------------------------------------------------------------------------ small problems
def test_small_problem_falls_back_to_dense_once_logged(caplog):
    core._LOGGED.clear()
    q, k, v = (torch.randn(1, 2, 16 * 16, 8, dtype=torch.float64) for _ in range(3))
    kw = dict(spatial_shape=(16, 16), num_regions=4, topk=3)
    ref = spec_reference(q, k, v, (16, 16), 4, 3)
    scores = 1 * 2 * 256 * 256
    with caplog.at_level(logging.DEBUG, logger="visattn"):
        out = bra(q, k, v, dense_threshold=scores, **kw)
        out2 = bra(q, k, v, dense_threshold=scores, **kw)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(out2, ref, **F64)
    small = [r for r in caplog.records if "small problem" in r.getMessage()]
    assert [r.levelno for r in small] == [logging.INFO, logging.DEBUG]  # INFO once, then DEBUG
    assert small[0].name == "visattn" and "-> dense" in small[0].getMessage()
    # one score over the threshold, threshold 0, or a forced strategy: the block-sparse path
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visattn"):
        for extra in (dict(dense_threshold=scores - 1), dict(dense_threshold=0),
                      dict(dense_threshold=scores, strategy="aligned")):
            torch.testing.assert_close(bra(q, k, v, **extra, **kw), ref, **F64)
    assert not any("small problem" in r.getMessage() for r in caplog.records)
    assert core.choose_strategy(core.make_region_grid((56, 56), 7), 3136, batch_heads=8,
                                dense_threshold=8 * 3136 ** 2) == ("dense", 0)
    assert core.choose_strategy(core.make_region_grid((56, 56), 7), 3136, batch_heads=8,
                                dense_threshold=8 * 3136 ** 2 - 1) == ("aligned", 64)
    # memory cap: a (B, 1, N, N) mask over DENSE_MASK_MAX_ELEMS keeps the block-sparse path whatever the threshold
    assert core.choose_strategy(core.make_region_grid((128, 128), 16), 16384, batch_heads=1,
                                dense_threshold=1 << 40) == ("aligned", 64)
    assert core.DENSE_MASK_MAX_ELEMS < 16384 ** 2


def test_small_problem_fallback_default_is_cuda_only_and_exact_with_padding_and_gradients():
    assert core.DENSE_SCORES_THRESHOLD > 0
    ins = [torch.randn(2, 2, 10 * 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ins2 = [t.detach().clone().requires_grad_() for t in ins]
    kw = dict(spatial_shape=(10, 9), num_regions=3, topk=4, mask_padding=True)
    out = bra(*ins, dense_threshold=1 << 40, **kw)      # dense fallback
    ref = bra(*ins2, dense_threshold=0, **kw)           # packed block-sparse path
    torch.testing.assert_close(out, ref, **F64)
    go = torch.randn_like(out)
    (out * go).sum().backward()
    (ref * go).sum().backward()
    for a, b in zip(ins, ins2):
        torch.testing.assert_close(a.grad, b.grad, **F64)


def test_method_dense_threshold_option():
    with pytest.raises(ValueError, match="dense_threshold"):
        BiLevelRouting(num_regions=2, topk=1, dense_threshold=-1)
    n = 1 + 64
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    geo = TokenGeometry(batch=1, heads=2, seq_len=n, kv_len=n, grid=(8, 8), spatial_start=1)
    ref = spec_reference(q, k, v, (8, 8), 2, 2, prefix=1, mask_padding=True)
    for thr in (None, 0, 1 << 30):
        out = BiLevelRouting(num_regions=2, topk=2, dense_threshold=thr)(q, k, v, geo)
        torch.testing.assert_close(out, ref, **F64)


# ------------------------------------------------------------------------------------------------ Triton (CPU)
@pytest.mark.skipif(torch.cuda.is_available() or "triton" not in available_backends(),
                    reason="Triton interpreter not available")
@pytest.mark.parametrize("hw,S,prefix,suffix,mask_padding", [
    ((7, 8), 2, 1, 2, True),    # padding masked (PARTIAL grid blocks) + extras (ragged block), general lists
    ((8, 8), 2, 0, 0, False),   # the plain aligned path, view permutation
])
def test_triton_interpreter_direct_layouts_forward_backward(hw, S, prefix, suffix, mask_padding):
    n = prefix + hw[0] * hw[1] + suffix
    geo = TokenGeometry(batch=2, heads=2, seq_len=n, kv_len=n, grid=hw, spatial_start=prefix)
    ins = [torch.randn(2, 2, n, 16, requires_grad=True) for _ in range(3)]
    ins2 = [t.detach().clone().requires_grad_() for t in ins]
    m = BiLevelRouting(num_regions=S, topk=2, mask_padding=mask_padding, backend="triton", dense_threshold=0)
    ref_m = BiLevelRouting(num_regions=S, topk=2, mask_padding=mask_padding, backend="sdpa", dense_threshold=0)
    out, ref = m(*ins, geo), ref_m(*ins2, geo)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    go = torch.randn_like(out)
    (out * go).sum().backward()
    (ref * go).sum().backward()
    for a, b in zip(ins, ins2):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_named_backend_turns_the_default_dense_fallback_off(monkeypatch):
    """The default small-problem threshold applies to backend="auto" only; a named backend is honoured."""
    from types import SimpleNamespace

    from visattn.methods import routing as rmod

    grid = core.make_region_grid((14, 14), 7)
    real_order = core.token_order(grid, 0, 196, "cpu")
    monkeypatch.setattr(core, "token_order", lambda *a, **kw: real_order)  # no CUDA needed for the decision
    monkeypatch.setattr(rl, "get_plan", lambda *a, **kw: None)
    monkeypatch.setattr(rmod, "_DECISIONS", {})  # keep the fake decisions out of the real cache
    q = SimpleNamespace(shape=(1, 2, 196, 8), device=torch.device("cuda"))
    assert rmod._decide(grid, 0, q, "auto", None, None, False, "auto")[-1] == core.DENSE_SCORES_THRESHOLD
    assert rmod._decide(grid, 0, q, "auto", None, None, False, "triton")[-1] == 0
