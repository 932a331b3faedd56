"""Triton block-sparse kernels (interpreter on CPU) against fp64 dense references; dispatcher; flex parity.

Two oracles: ``masked_attention`` in float64 with ``layout.to_dense()``, and the same with a mask built
independently from the method's ``mask_mod`` on all (q, k) pairs in original positions. Tolerances
(max abs error): fp32 2e-5, fp16 3e-3, bf16 3e-2 (outputs of unit-variance inputs); LSE 1e-4 (fp32 math).
"""
import os
import pytest
import torch

from visattn.kernels import BlockLayout, block_sparse_attention, masked_attention
from visattn.kernels import triton_backend as tb

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}

pytestmark = [pytest.mark.skipif(not tb.INTERPRET and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU"),
              pytest.mark.usefixtures("one_thread")]

DEV = "cuda" if torch.cuda.is_available() and not tb.INTERPRET else "cpu"


def _mod_dense(mod, B, H, nq, nk):
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    return torch.as_tensor(mod(b, h, torch.arange(nq).view(1, 1, -1, 1), torch.arange(nk).view(1, 1, 1, -1))
                           ).expand(B, H, nq, nk)


def _hash_mod(density=0.7, salt=0):
    """A deterministic pseudo-random element predicate (gives FULL, PARTIAL and EMPTY blocks)."""
    def mod(b, h, q, k):
        region = ((q // 32) * 31 + (k // 32) * 17 + b * 7 + h * 13 + salt) % 10
        elem = ((q * 131 + k * 71 + h * 3 + b) % 97) < 80
        return (region < int(density * 10)) & ((region < 4) | elem)
    return mod


def _inputs(B, H, Hkv, nq, nk, D, dtype, requires_grad=False):
    g = lambda *s: torch.randn(*s, device=DEV, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return g(B, H, nq, D), g(B, Hkv, nk, D), g(B, Hkv, nk, D)


def _ref(q, k, v, mask, scale=None):
    return masked_attention(q.double(), k.double(), v.double(), mask.to(q.device), scale=scale, return_lse=True)


def _check(out, lse, ref_out, ref_lse, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = (out.double() - ref_out).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]} ({dtype})"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    if fin.any():
        lerr = (lse.double() - ref_lse)[fin].abs().max().item()
        assert lerr <= 1e-4, f"LSE error {lerr}"


CASES = [
    # name, B, H, Hkv, nq, nk, D, dtype, layout batch/heads (None = shared), block
    ("fp32_per_bh", 2, 2, 2, 64, 64, 32, torch.float32, (2, 2), 16),
    ("fp16_ragged_d80", 1, 2, 2, 50, 75, 80, torch.float16, (None, 2), 32),
    ("bf16_gqa_d64", 1, 4, 2, 64, 64, 64, torch.bfloat16, (None, 4), 32),
    ("fp32_cross_rect_block", 2, 2, 1, 40, 100, 32, torch.float32, (2, None), (16, 32)),
    ("fp16_shared_d96", 2, 2, 2, 48, 48, 96, torch.float16, (None, None), 16),
    ("fp32_d128_ragged", 1, 1, 1, 33, 47, 128, torch.float32, (None, None), 32),
    ("fp16_block32x64_words", 1, 2, 2, 100, 130, 64, torch.float16, (None, 2), (32, 64)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_fp64_references(case):
    _, B, H, Hkv, nq, nk, D, dtype, (lb, lh), bs = case
    for salt in range(20):  # first predicate whose layout has FULL and PARTIAL blocks (exercise both loops)
        mod = _hash_mod(salt=salt)
        lay = BlockLayout.from_mask_mod(mod, batch=lb, heads=lh, seq_lens=(nq, nk), block_size=bs, device=DEV)
        s = lay.stats()
        if s["full"] > 0 and s["partial"] > 0 and s["empty"] > 0:
            break
    assert s["full"] > 0 and s["partial"] > 0
    q, k, v = _inputs(B, H, Hkv, nq, nk, D, dtype)
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    _check(out, lse, *_ref(q, k, v, lay.to_dense()), dtype)
    # independent oracle: the predicate itself on every pair
    indep = _mod_dense(mod, lb or 1, lh or 1, nq, nk)
    _check(out, lse, *_ref(q, k, v, indep), dtype)


def test_empty_rows_give_zero_and_minus_inf_without_nan():
    # query block 1 visits nothing; query rows 40..47 have no kept key inside their PARTIAL block
    def mod(b, h, q, k):
        return ((q < 16) | ((q >= 32) & (q < 40))) & (k < 20)
    nq, nk = 48, 40
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=(nq, nk), block_size=16, device=DEV)
    assert int(lay.full_counts[0, 0, 1] + lay.partial_counts[0, 0, 1]) == 0
    q, k, v = _inputs(1, 2, 2, nq, nk, 32, torch.float32, requires_grad=True)
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    assert torch.equal(out[:, :, 16:32], torch.zeros_like(out[:, :, 16:32]))
    assert torch.equal(out[:, :, 40:], torch.zeros_like(out[:, :, 40:]))
    assert bool(torch.isneginf(lse[:, :, 16:32]).all()) and bool(torch.isneginf(lse[:, :, 40:]).all())
    _check(out.detach(), lse.detach(), *_ref(q, k, v, _mod_dense(mod, 1, 1, nq, nk)), torch.float32)
    (out.sum() + 0 * lse[torch.isfinite(lse)].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 16:32], torch.zeros_like(q.grad[:, :, 16:32]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permutation_round_trip(dtype):
    nq = nk = 64
    perm = torch.randperm(nq, device=DEV)

    def mod(b, h, q, k):  # strided pattern: block-sparse only after the permutation
        return (q % 4) == (k % 4)
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=nq, block_size=16, device=DEV,
                                    perm_q=perm, perm_k=perm)
    q, k, v = _inputs(1, 2, 2, nq, nk, 32, dtype)
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    _check(out, lse, *_ref(q, k, v, _mod_dense(mod, 1, 1, nq, nk)), dtype)
    # a permutation that groups q % 4 makes the layout fully block-sparse
    order = torch.argsort(torch.arange(nq, device=DEV) % 4, stable=True)
    lay2 = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=nq, block_size=16, device=DEV,
                                     perm_q=order, perm_k=order)
    assert lay2.stats()["partial"] == 0 and lay2.stats()["full"] == 4
    out2 = block_sparse_attention(q, k, v, lay2, backend="triton")
    assert (out2.double() - out.double()).abs().max().item() <= 2 * TOL[dtype]


def test_broadcast_layout_equals_expanded_layout():
    mod = _hash_mod(salt=3)
    shared = BlockLayout.from_mask_mod(lambda b, h, q, k: mod(0 * b, 0 * h, q, k), batch=None, heads=None,
                                       seq_lens=64, block_size=16, device=DEV)
    per = BlockLayout.from_mask_mod(lambda b, h, q, k: mod(0 * b, 0 * h, q, k), batch=2, heads=2,
                                    seq_lens=64, block_size=16, device=DEV)
    assert shared.full_counts.shape[:2] == (1, 1) and per.full_counts.shape[:2] == (2, 2)
    q, k, v = _inputs(2, 2, 2, 64, 64, 32, torch.float32)
    a = block_sparse_attention(q, k, v, shared, backend="triton")
    b = block_sparse_attention(q, k, v, per, backend="triton")
    assert torch.equal(a, b)


def test_from_block_mask_random_blocks_and_scale():
    bm = torch.rand(2, 1, 4, 4) < 0.5
    bm[0, 0, 2] = False  # an empty row
    lay = BlockLayout.from_block_mask(bm.to(DEV), block_size=16, seq_lens=(64, 60))
    q, k, v = _inputs(2, 3, 3, 64, 60, 64, torch.float16)
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True, scale=0.3)
    _check(out, lse, *_ref(q, k, v, lay.to_dense(), scale=0.3), torch.float16)


BWD_CASES = [
    ("fp32_gqa_ragged_partial", 1, 4, 2, 50, 70, 32, (None, 4), 16),
    ("fp32_cross_perbatch_d80", 2, 2, 2, 40, 100, 80, (2, None), (32, 64)),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_backward_matches_reference_autograd(case):
    _, B, H, Hkv, nq, nk, D, (lb, lh), bs = case
    mod = _hash_mod(salt=5)
    lay = BlockLayout.from_mask_mod(mod, batch=lb, heads=lh, seq_lens=(nq, nk), block_size=bs, device=DEV)
    q, k, v = _inputs(B, H, Hkv, nq, nk, D, torch.float32, requires_grad=True)
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    fin = torch.isfinite(lse)
    loss = (out * go).sum() + (torch.where(fin, lse, 0) * gl).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = masked_attention(qd, kd, vd, _mod_dense(mod, lb or 1, lh or 1, nq, nk).to(DEV), return_lse=True)
    rloss = (ro * go.double()).sum() + (torch.where(fin, rl, 0) * gl.double()).sum()
    rgrads = torch.autograd.grad(rloss, (qd, kd, vd))
    for name, g, r in zip("qkv", grads, rgrads):
        assert torch.isfinite(g).all()
        err = (g.double() - r).abs().max().item()
        assert err <= 5e-5 * max(1.0, r.abs().max().item()), f"d{name} error {err}"


def test_backward_half_precision_close_to_reference():
    mod = _hash_mod(salt=9)
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=64, block_size=32, device=DEV)
    q, k, v = _inputs(1, 2, 2, 64, 64, 64, torch.bfloat16, requires_grad=True)
    out = block_sparse_attention(q, k, v, lay, backend="triton")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro = masked_attention(qd, kd, vd, lay.to_dense())
    rgrads = torch.autograd.grad(ro, (qd, kd, vd), go.double())
    for g, r in zip(grads, rgrads):
        rel = (g.double() - r).norm() / r.norm()
        assert rel <= 2e-2, f"relative error {rel}"


def test_gradcheck_fp64_reference_path():
    mod = _hash_mod(salt=1)
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=(18, 20), block_size=16)
    q = torch.randn(1, 1, 18, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 20, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 20, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: block_sparse_attention(a, b, c, lay, backend="sdpa"), (q, k, v))


@pytest.mark.skipif(DEV != "cpu", reason="CPU flex parity (eager); the GPU file checks compiled flex")
def test_flex_parity_cpu_no_grad():
    mod = _hash_mod(salt=2)
    lay = BlockLayout.from_mask_mod(mod, batch=2, heads=None, seq_lens=(50, 70), block_size=16)
    q, k, v = _inputs(2, 2, 1, 50, 70, 32, torch.float32)
    with torch.no_grad():
        fo, fl = block_sparse_attention(q, k, v, lay, backend="flex", return_lse=True)
        to, tl_ = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    assert (fo - to).abs().max().item() <= 2e-5
    fin = torch.isfinite(tl_)
    assert torch.equal(torch.isfinite(fl), fin)
    assert (fl - tl_)[fin].abs().max().item() <= 1e-4
    bm = lay.to_flex_block_mask()
    assert torch.equal(bm.full_kv_num_blocks, lay.full_counts)
    assert torch.equal(bm.kv_num_blocks, lay.partial_counts)
    from torch.nn.attention.flex_attention import create_mask
    assert torch.equal(create_mask(bm.mask_mod, 2, 1, 50, 70, device="cpu"), lay.to_dense(original_order=False))
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        block_sparse_attention(q.requires_grad_(), k, v, lay, backend="flex")


def test_dispatcher_errors_and_auto():
    lay = BlockLayout.from_mask_mod(_hash_mod(), batch=None, heads=None, seq_lens=32, block_size=16, device=DEV)
    q, k, v = _inputs(1, 1, 1, 32, 32, 32, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        block_sparse_attention(q, k, v, lay, backend="nope")
    with pytest.raises(RuntimeError, match="dtype torch.float64 is not supported"):
        block_sparse_attention(q.double(), k.double(), v.double(), lay, backend="triton")
    with pytest.raises(RuntimeError, match="head dim 8"):
        block_sparse_attention(q[..., :8], k[..., :8], v[..., :8], lay, backend="triton")
    from visattn.kernels.xformers_backend import xformers_available
    if xformers_available() is not None:
        with pytest.raises(RuntimeError, match="xformers"):
            block_sparse_attention(q, k, v, lay, backend="xformers")
    if DEV == "cpu":  # auto = exact reference on CPU
        out = block_sparse_attention(q, k, v, lay)
        assert torch.allclose(out.double(), _ref(q, k, v, lay.to_dense())[0], atol=1e-6)


def test_block_size_probe():
    bm = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    lay = BlockLayout.from_block_mask(bm, block_size=24, seq_lens=48).to(DEV)
    assert "power of two" in tb._probe(torch.empty(1, 1, 48, 32, device=DEV), lay, False)


def test_xformers_plan_detection():
    from visattn.kernels.xformers_backend import xformers_plan
    dense = BlockLayout.from_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16, seq_lens=40)
    assert xformers_plan(dense) == ("dense", None)
    diag = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    diag[0, 0, :2, :2] = True
    diag[0, 0, 2:, 2:] = True
    kind, plan = xformers_plan(BlockLayout.from_block_mask(diag, block_size=16, seq_lens=(64, 60)))
    assert kind == "blockdiag" and plan == ([32, 32], [32, 28])
    band = BlockLayout.from_mask_mod(lambda b, h, q, k: (q - k).abs() < 20, batch=None, heads=None,
                                     seq_lens=64, block_size=16)
    kind, why = xformers_plan(band)
    assert kind == "none" and "PARTIAL" in why


@pytest.fixture
def small_tiles():
    """Run each layout block as 16x16 loop steps (sub-tiling) with TMA tensor-descriptor loads in forward."""
    saved = dict(tb.CONFIG_OVERRIDES)
    for kern in ("fwd", "bwd_dq", "bwd_dkdv"):
        tb.CONFIG_OVERRIDES[(kern, None, None, None, None)] = {"TM": 16, "TN": 16, "tma": True}
    yield
    tb.CONFIG_OVERRIDES.clear()
    tb.CONFIG_OVERRIDES.update(saved)


def test_sub_tiles_and_tma_match_reference(small_tiles):
    mod = _hash_mod(salt=4)
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=2, seq_lens=(50, 70), block_size=32, device=DEV)
    assert tb.kernel_config("fwd", 32, 32, 64, torch.float32)["TN"] == 16
    q, k, v = _inputs(1, 2, 1, 50, 70, 80, torch.float32, requires_grad=True)
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    _check(out.detach(), lse.detach(), *_ref(q, k, v, lay.to_dense()), torch.float32)
    _assert_grads_match_fp64(out, (q, k, v), lay.to_dense())


def _assert_grads_match_fp64(out, qkv, dense, tol: float = 5e-5) -> None:
    """dq, dk, dv of ``out`` (for a random output gradient) against fp64 masked attention with ``dense``,
    to ``tol`` relative to the largest reference gradient."""
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, qkv, go)
    ref_in = tuple(t.detach().double().requires_grad_() for t in qkv)
    ro = masked_attention(*ref_in, dense)
    for g, r in zip(grads, torch.autograd.grad(ro, ref_in, go.double())):
        assert (g.double() - r).abs().max().item() <= tol * max(1.0, r.abs().max().item())


@pytest.fixture
def pointer_loads():
    """Forward with plain pointer loads (no tensor descriptors), the path taken when TMA is off or unusable."""
    saved = dict(tb.CONFIG_OVERRIDES)
    tb.CONFIG_OVERRIDES[("fwd", None, None, None, None)] = {"tma": False}
    tb.CONFIG_OVERRIDES[("fwd_short", None, None, None, None)] = {"tma": False}
    yield
    tb.CONFIG_OVERRIDES.clear()
    tb.CONFIG_OVERRIDES.update(saved)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_non_contiguous_heads_last_inputs(tma, request):
    """q/k/v as (B, N, H, D) buffers viewed as (B, H, N, D), like the adapters pass them."""
    if not tma:
        request.getfixturevalue("pointer_loads")
    mod = _hash_mod(salt=6)
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=(40, 56), block_size=16, device=DEV)
    q = torch.randn(1, 40, 2, 64, device=DEV).transpose(1, 2)
    k = torch.randn(1, 56, 2, 64, device=DEV).transpose(1, 2)
    v = torch.randn(1, 56, 2, 64, device=DEV).transpose(1, 2)
    assert not q.is_contiguous()
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    _check(out, lse, *_ref(q, k, v, lay.to_dense()), torch.float32)


def test_head_dim_256_and_32():
    mod = _hash_mod(salt=7)
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=(32, 48), block_size=16, device=DEV)
    for D in (256, 32):
        q, k, v = _inputs(1, 1, 1, 32, 48, D, torch.float16)
        out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
        _check(out, lse, *_ref(q, k, v, lay.to_dense()), torch.float16)


def test_causal_rows_run_longest_first_and_match_reference():
    """Rows of very different lengths (causal) take the reordered grid; results are unchanged."""
    mod = lambda b, h, q, k: k <= q  # noqa: E731
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=90, block_size=16, device=DEV)
    order = tb._orders(lay, False)
    assert order is not None and order[0, 0, 0].item() == lay.num_q_blocks - 1  # the longest row first
    assert tb._orders(lay, True) is not None
    q, k, v = _inputs(1, 2, 1, 90, 90, 32, torch.float32, requires_grad=True)
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    _check(out.detach(), lse.detach(), *_ref(q, k, v, _mod_dense(mod, 1, 1, 90, 90)), torch.float32)
    _assert_grads_match_fp64(out, (q, k, v), lay.to_dense())


@pytest.mark.parametrize("fuse", [False, True, "q"], ids=["copies", "fused", "fused_q"])
def test_permutation_fused_in_kernels_matches_copies(fuse):
    """The permutation applied by the kernels' loads/stores equals the gather/scatter-copy path, fwd + bwd."""
    nq, nk = 60, 72
    pq, pk = torch.randperm(nq, device=DEV), torch.randperm(nk, device=DEV)
    mod = _hash_mod(salt=8)
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=2, seq_lens=(nq, nk), block_size=16, device=DEV,
                                    perm_q=pq, perm_k=pk)
    q, k, v = _inputs(1, 2, 1, nq, nk, 32, torch.float32, requires_grad=True)
    out, lse = tb.triton_block_sparse_attention(q, k, v, lay, return_lse=True, fuse_permutation=fuse)
    dense = _mod_dense(mod, 1, 2, nq, nk)
    _check(out.detach(), lse.detach(), *_ref(q, k, v, dense), torch.float32)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    fin = torch.isfinite(lse)
    grads = torch.autograd.grad((out * go).sum() + (torch.where(fin, lse, 0) * gl).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = masked_attention(qd, kd, vd, dense.to(DEV), return_lse=True)
    rgrads = torch.autograd.grad((ro * go.double()).sum() + (torch.where(fin, rl, 0) * gl.double()).sum(),
                                 (qd, kd, vd))
    for g, r in zip(grads, rgrads):
        assert (g.double() - r).abs().max().item() <= 5e-5 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("fuse", [False, True, "q"], ids=["copies", "fused", "fused_q"])
def test_heads_last_inputs_give_heads_last_output(fuse, monkeypatch):
    """(B, N, H, D) memory seen as (B, H, N, D): the output comes back heads-last (so the caller's transpose +
    reshape is a view) and equals the reference, in every mode; the module flag is read per call."""
    nq = 75
    perm = torch.randperm(nq, device=DEV)
    mod = _hash_mod(salt=3)
    lay = BlockLayout.from_mask_mod(mod, batch=None, heads=None, seq_lens=nq, block_size=16, device=DEV,
                                    perm_q=perm, perm_k=perm)
    x = torch.randn(3, 2, nq, 4, 32, device=DEV)  # (3, B, N, H, D)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(0))
    monkeypatch.setattr(tb, "FUSE_PERMUTATION", fuse)
    out, lse = block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True)
    assert out.shape == (2, 4, nq, 32) and out.transpose(1, 2).is_contiguous()
    _check(out, lse, *_ref(q, k, v, _mod_dense(mod, 1, 1, nq, nq).expand(2, 4, nq, nq)), torch.float32)


def test_fuse_mode_values():
    assert tb.fuse_mode(False) == (False, False) and tb.fuse_mode(True) == (True, True)
    assert tb.fuse_mode("q") == (True, False) and tb.fuse_mode("1") == (True, True)
    with pytest.raises(ValueError, match="fuse_permutation"):
        tb.fuse_mode("kv")


def test_fuse_mode_auto_resolution():
    """'auto' (the default): copies on the CPU and under autograd; on CUDA inference "q" for large K/V and True
    for small ones; copies when the layout has no permutation."""
    from types import SimpleNamespace

    assert tb.FUSE_PERMUTATION == "auto" or os.environ.get("VISATTN_FUSE_PERMUTATION")
    with pytest.raises(ValueError, match="resolve_fuse_mode"):
        tb.fuse_mode("auto")
    perm = torch.randperm(64)
    full = BlockLayout.from_mask_mod(lambda b, h, qi, ki: qi >= 0, batch=None, heads=None, seq_lens=64,
                                     block_size=16, perm_q=perm, perm_k=perm)
    part = BlockLayout.from_mask_mod(lambda b, h, qi, ki: qi >= ki, batch=None, heads=None, seq_lens=64,
                                     block_size=16, perm_q=perm, perm_k=perm)
    plain = BlockLayout.from_mask_mod(lambda b, h, qi, ki: qi >= ki, batch=None, heads=None, seq_lens=64,
                                      block_size=16)
    cpu = torch.zeros(1)
    big = tb.Q_MODE_MIN_BYTES // 2  # K and V of this many bytes each: "q"
    cuda = SimpleNamespace(device=torch.device("cuda"), requires_grad=False, shape=(big,), numel=lambda: big,
                           element_size=lambda: 1)
    small = SimpleNamespace(device=torch.device("cuda"), requires_grad=False, shape=(8,), numel=lambda: 8,
                            element_size=lambda: 2)
    cuda_grad = SimpleNamespace(device=torch.device("cuda"), requires_grad=True)
    assert tb.resolve_fuse_mode("auto", cpu, cpu, cpu, part) is False
    assert tb.resolve_fuse_mode("auto", cuda, cuda, cuda, part) == "q"
    assert tb.resolve_fuse_mode("auto", small, small, small, part) is True  # small calls: fewer launches
    assert tb.resolve_fuse_mode("auto", cuda, cuda, cuda, full) == "q"
    assert tb.resolve_fuse_mode("auto", small, small, small, full) is True
    assert tb.resolve_fuse_mode("auto", cuda, cuda, cuda, plain) is False
    assert tb.resolve_fuse_mode("auto", cuda_grad, cuda, cuda, part) is False
    with torch.no_grad():
        assert tb.resolve_fuse_mode("auto", cuda_grad, cuda, cuda, part) == "q"
    assert tb.resolve_fuse_mode(True, cpu, cpu, cpu, part) is True


def test_unknown_fuse_env_value_is_an_error():
    """VISATTN_FUSE_PERMUTATION with an unknown value fails at import, naming the allowed values."""
    import subprocess
    import sys

    env = {**os.environ, "VISATTN_FUSE_PERMUTATION": "fused", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", "import visattn.kernels.triton_backend"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "VISATTN_FUSE_PERMUTATION='fused'" in r.stderr and "'auto'" in r.stderr
