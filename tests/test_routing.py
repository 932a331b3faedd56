"""Bi-level routing attention: functional core vs the fp64 spec reference and the gather re-implementation."""
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from visattn.functional import bilevel_routing_attention as bra
from visattn.kernels import available_backends
from visattn.methods import _routing_core as core
from visattn.methods.routing import bilevel_routing_attention_gather as gather_bra

from _routing_ref import spec_reference

F64 = dict(atol=1e-10, rtol=0)
F32 = dict(atol=1e-5, rtol=1e-5)


def qkv(B, H, N, D, dtype=torch.float64, hk=None):
    return (torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, hk or H, N, D, dtype=dtype),
            torch.randn(B, hk or H, N, D, dtype=dtype))


@pytest.mark.parametrize("hw,S,topk,mask_padding,scale", [
    ((8, 8), 2, 2, False, None),        # divisible, regions of 16 -> aligned
    ((12, 12), 3, 4, False, "legacy"),  # released scale quirk
    ((10, 9), 3, 4, False, None),       # legacy padding: zero tokens, unmasked
    ((10, 9), 3, 4, True, 0.3),         # masked padding, explicit scale
    ((7, 7), 7, 5, False, None),        # 1-token regions -> dense fallback
])
def test_matches_spec_reference_fp64(hw, S, topk, mask_padding, scale):
    q, k, v = qkv(2, 3, hw[0] * hw[1], 8)
    out, idx = bra(q, k, v, spatial_shape=hw, num_regions=S, topk=topk, scale=scale, mask_padding=mask_padding,
                   return_routing=True)
    sc = (3 * 8) ** -0.5 if scale == "legacy" else scale
    ref, ref_idx = spec_reference(q, k, v, hw, S, topk, scale=sc, mask_padding=mask_padding, return_routing=True)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref, **F64)


@pytest.mark.parametrize("strategy", ["aligned", "packed", "dense"])
def test_strategies_agree(strategy):
    q, k, v = qkv(2, 2, 16 * 16, 8)
    ref = spec_reference(q, k, v, (16, 16), 4, 3)
    out = bra(q, k, v, spatial_shape=(16, 16), num_regions=4, topk=3, strategy=strategy)
    torch.testing.assert_close(out, ref, **F64)


@pytest.mark.parametrize("hw,S,topk", [((16, 16), 4, 3), ((14, 14), 7, 4), ((11, 13), 3, 2)])
def test_equals_gather_reimplementation(hw, S, topk):
    q, k, v = qkv(2, 4, hw[0] * hw[1], 16, dtype=torch.float32)
    out, idx = bra(q, k, v, spatial_shape=hw, num_regions=S, topk=topk, scale="legacy", return_routing=True)
    ref, ref_idx = gather_bra(q, k, v, spatial_shape=hw, num_regions=S, topk=topk, scale="legacy",
                              return_routing=True)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(out, ref, **F32)


def test_gradients_match_gather_fp64():
    ins = [t.requires_grad_() for t in qkv(1, 2, 12 * 12, 8)]
    ins2 = [t.detach().clone().requires_grad_() for t in ins]
    go = torch.randn(1, 2, 144, 8, dtype=torch.float64)
    (bra(*ins, spatial_shape=(12, 12), num_regions=3, topk=2) * go).sum().backward()
    (gather_bra(*ins2, spatial_shape=(12, 12), num_regions=3, topk=2) * go).sum().backward()
    for a, b in zip(ins, ins2):
        torch.testing.assert_close(a.grad, b.grad, **F64)


@pytest.mark.parametrize("hw,S,mask_padding", [((16, 16), 4, False), ((10, 9), 3, True), ((9, 9), 9, False)])
def test_topk_all_equals_dense(hw, S, mask_padding):
    q, k, v = qkv(2, 2, hw[0] * hw[1], 8)
    out = bra(q, k, v, spatial_shape=hw, num_regions=S, topk=S * S, mask_padding=mask_padding)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **F64)


def test_gqa_and_given_routing():
    q, k, v = qkv(2, 4, 64, 8, hk=2)
    ref = spec_reference(q, k, v, (8, 8), 2, 3)
    torch.testing.assert_close(bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=3), ref, **F64)
    routing = torch.tensor([[[3], [0], [0], [1]]])
    out = bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=1, routing=routing)
    torch.testing.assert_close(out, spec_reference(q, k, v, (8, 8), 2, 1, routing=routing), **F64)


def test_tie_break_is_lowest_region_index():
    q = torch.ones(1, 2, 36, 4)
    k = torch.ones(1, 2, 36, 4)
    _, idx = bra(q, k, q, spatial_shape=(6, 6), num_regions=3, topk=4, return_routing=True)
    assert torch.equal(idx, torch.arange(4).expand(1, 9, 4))


def test_routing_is_shared_and_not_differentiated():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 64, 4))
    _, idx = bra(q, k, v, spatial_shape=(8, 8), num_regions=4, topk=2, return_routing=True)
    assert idx.shape == (1, 16, 2) and idx.dtype == torch.int64 and not idx.requires_grad


def test_errors():
    q, k, v = qkv(1, 2, 64, 4)
    with pytest.raises(ValueError, match="exceeds the number of regions"):
        bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=5)
    with pytest.raises(ValueError, match="topk must be a positive"):
        bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=0)
    with pytest.raises(ValueError, match="does not fit"):
        bra(q, k, v, spatial_shape=(8, 8), num_regions=9, topk=1)
    with pytest.raises(ValueError, match="does not fit"):  # 5 rows in 4 regions: the last region row is all padding
        bra(torch.zeros(1, 1, 40, 4), torch.zeros(1, 1, 40, 4), torch.zeros(1, 1, 40, 4), spatial_shape=(5, 8),
            num_regions=4, topk=1)
    with pytest.raises(ValueError, match="needs N=64"):
        bra(q[:, :, :60], k[:, :, :60], v[:, :, :60], spatial_shape=(8, 8), num_regions=2, topk=1)
    with pytest.raises(ValueError, match="scale must be"):
        bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=1, scale="full")
    with pytest.raises(ValueError, match="routing must have shape"):
        bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=1, routing=torch.zeros(1, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="strategy"):
        bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=1, strategy="fast")


def test_strategy_choice_and_logging(caplog):
    core._LOGGED.clear()
    assert core.choose_strategy(core.make_region_grid((56, 56), 7), 3136) == ("aligned", 64)
    assert core.choose_strategy(core.make_region_grid((28, 28), 7), 784) == ("aligned", 16)
    assert core.choose_strategy(core.make_region_grid((14, 14), 7), 196) == ("dense", 0)
    assert core.choose_strategy(core.make_region_grid((140, 140), 70), 19600) == ("packed", 16)
    assert core.choose_strategy(core.make_region_grid((49, 49), 7), 2401) == ("packed", 64)
    q, k, v = qkv(1, 1, 14 * 14, 4)
    with caplog.at_level(logging.INFO, logger="visattn"):
        bra(q, k, v, spatial_shape=(14, 14), num_regions=7, topk=2)
    assert any("-> dense" in r.getMessage() for r in caplog.records)


def test_aligned_layout_is_all_full_blocks():
    grid = core.make_region_grid((32, 32), 4)  # regions of 8x8 = 64 tokens
    order = core.token_order(grid, 0, 1024, "cpu")
    routing = torch.stack([torch.randperm(16)[:5] for _ in range(16)]).unsqueeze(0).repeat(2, 1, 1)
    layout = core.build_layout(routing, order, 16, 64, mask_padding=False)
    s = layout.stats()
    assert (s["full"], s["partial"], s["total"]) == (2 * 16 * 5, 0, 2 * 16 * 16)
    assert layout.full_counts.shape == (2, 1, 16)
    # kernel position i holds token perm[i]: region 0 = rows 0..7, cols 0..7
    assert order.perm[:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 32]


def test_packed_layout_mask_matches_dense_mask():
    grid = core.make_region_grid((15, 15), 5)  # regions of 3x3 = 9 tokens
    order = core.token_order(grid, 0, 225, "cpu")
    routing = core.compute_routing(*qkv(2, 1, 225, 4)[:2], grid, 3, scale=1.0)
    layout = core.build_layout(routing, order, 25, 16, mask_padding=False)
    assert layout.stats()["partial"] > 0
    assert torch.equal(layout.to_dense(), core.dense_mask(routing, order, 25, mask_padding=False))


@settings(max_examples=20, deadline=None)
@given(h=st.integers(2, 11), w=st.integers(2, 11), S=st.integers(1, 4), tk=st.integers(1, 16),
       B=st.integers(1, 2), H=st.integers(1, 2), D=st.sampled_from([4, 8]), mask_padding=st.booleans(),
       seed=st.integers(0, 1000))
def test_property_matches_spec(h, w, S, tk, B, H, D, mask_padding, seed):
    if not core.regions_fit((h, w), S):
        with pytest.raises(ValueError):
            core.make_region_grid((h, w), S)
        return
    topk = min(tk, S * S)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, h * w, D, dtype=torch.float64, generator=g) for _ in range(3))
    out = bra(q, k, v, spatial_shape=(h, w), num_regions=S, topk=topk, mask_padding=mask_padding)
    ref = spec_reference(q, k, v, (h, w), S, topk, mask_padding=mask_padding)
    torch.testing.assert_close(out, ref, **F64)


@pytest.mark.skipif(torch.cuda.is_available() or "triton" not in available_backends(),
                    reason="Triton interpreter not available")
def test_triton_interpreter_tiny():
    q, k, v = qkv(1, 1, 8 * 8, 16, dtype=torch.float32)
    out = bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=2, backend="triton")
    ref = bra(q, k, v, spatial_shape=(8, 8), num_regions=2, topk=2, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # per-batch routing (layout batch dim 2), GQA, backward
    q, k, v = qkv(2, 2, 8 * 8, 16, dtype=torch.float32, hk=1)
    kw = dict(spatial_shape=(8, 8), num_regions=2, topk=2)
    qt, qs = q.clone().requires_grad_(), q.clone().requires_grad_()
    out, idx = bra(qt, k, v, backend="triton", return_routing=True, **kw)
    assert not torch.equal(idx[0], idx[1])
    ref = bra(qs, k, v, backend="sdpa", **kw)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(qt.grad, qs.grad, atol=1e-4, rtol=1e-4)
    # packed path: 3x3-token regions share 16-token blocks, PARTIAL blocks carry element masks
    q, k, v = qkv(1, 1, 9 * 9, 16, dtype=torch.float32)
    kw = dict(spatial_shape=(9, 9), num_regions=3, topk=2, strategy="packed")
    out = bra(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(out, bra(q, k, v, backend="sdpa", **kw), atol=1e-4, rtol=1e-4)


def test_direct_aligned_layout_equals_generic_construction():
    grid = core.make_region_grid((16, 32), 4)  # regions of 4x8 = 32 tokens, block 16 -> 2 blocks per region
    order = core.token_order(grid, 0, 512, "cpu")
    routing = core.compute_routing(*qkv(2, 1, 512, 4)[:2], grid, 5, scale=1.0)
    fast = core.build_layout(routing, order, 16, 16, mask_padding=False)
    kmask = core.dense_mask(routing, order, 16, mask_padding=False)[:, :, order.perm][:, :, :, order.perm]
    generic = core.BlockLayout.from_block_mask(kmask.view(2, 1, 32, 16, 32, 16).any(-1).any(-2),
                                               block_size=16, seq_lens=512, perm_q=order.perm, perm_k=order.perm)
    assert fast.stats()["partial"] == 0 and fast.stats()["full"] == 2 * 32 * 10
    for name in ("full_counts", "full_indices", "partial_counts"):
        assert torch.equal(getattr(fast, name), getattr(generic, name)), name
    assert torch.equal(fast.to_dense(), core.dense_mask(routing, order, 16, mask_padding=False))
