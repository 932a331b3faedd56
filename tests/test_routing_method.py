"""The "routing" method (BiLevelRouting): geometry with extra tokens, fallbacks, pattern()."""
import logging

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn import TokenGeometry
from visattn.methods import BiLevelRouting

from _routing_ref import spec_reference

F64 = dict(atol=1e-10, rtol=0)


def qkv(B, H, N, D):
    return tuple(torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))


def test_registered():
    assert "routing" in visattn.list_methods()
    m = visattn.get_method("routing", num_regions=3, topk=2)
    assert isinstance(m, BiLevelRouting) and (m.num_regions, m.topk) == (3, 2)
    with pytest.raises(ValueError, match="exceeds"):
        BiLevelRouting(num_regions=2, topk=5)


@pytest.mark.parametrize("prefix,suffix,hw,S,mask_padding", [
    (1, 0, (8, 8), 2, True),      # ViT CLS token
    (0, 5, (6, 6), 3, True),      # joint attention: text tokens after the image
    (2, 3, (10, 9), 3, False),    # registers + suffix, legacy (unmasked) padding
])
def test_extra_tokens_are_global(prefix, suffix, hw, S, mask_padding):
    n = prefix + hw[0] * hw[1] + suffix
    q, k, v = qkv(2, 2, n, 8)
    geo = TokenGeometry(batch=2, heads=2, seq_len=n, kv_len=n, grid=hw, spatial_start=prefix)
    out = BiLevelRouting(num_regions=S, topk=2, mask_padding=mask_padding)(q, k, v, geo, scale=0.4)
    ref = spec_reference(q, k, v, hw, S, 2, scale=0.4, prefix=prefix, mask_padding=mask_padding)
    torch.testing.assert_close(out, ref, **F64)


@pytest.mark.parametrize("hw,S", [((8, 8), 2), ((10, 9), 3)])
def test_topk_all_equals_dense_with_extras(hw, S):
    n = 1 + hw[0] * hw[1] + 2
    q, k, v = qkv(1, 2, n, 8)
    geo = TokenGeometry(batch=1, heads=2, seq_len=n, kv_len=n, grid=hw, spatial_start=1)
    out = BiLevelRouting(num_regions=S, topk=S * S)(q, k, v, geo)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **F64)


def test_small_grid_and_cross_attention_fall_back_to_dense(caplog):
    q, k, v = qkv(1, 2, 16, 8)
    geo = TokenGeometry(batch=1, heads=2, seq_len=16, kv_len=16, grid=(4, 4), layer="up.0.attn1")
    with caplog.at_level(logging.INFO, logger="visattn"):
        out = BiLevelRouting(num_regions=7, topk=4)(q, k, v, geo)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **F64)
    assert any("dense attention" in r.getMessage() for r in caplog.records)
    kc = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    geo_x = TokenGeometry(batch=1, heads=2, seq_len=16, kv_len=7, grid=(4, 4), is_cross=True)
    out = BiLevelRouting(num_regions=2, topk=1)(q, kc, kc, geo_x)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kc, kc), **F64)


def test_attn_mask_rejected_and_legacy_scale():
    q, k, v = qkv(1, 2, 64, 8)
    geo = TokenGeometry(batch=1, heads=2, seq_len=64, kv_len=64, grid=(8, 8))
    with pytest.raises(ValueError, match="attention mask"):
        BiLevelRouting(num_regions=2, topk=1)(q, k, v, geo, attn_mask=torch.zeros(64, 64))
    out = BiLevelRouting(num_regions=2, topk=2, legacy_scale=True)(q, k, v, geo, scale=0.9)
    torch.testing.assert_close(out, spec_reference(q, k, v, (8, 8), 2, 2, scale=16 ** -0.5), **F64)


def test_pattern():
    geo = TokenGeometry(batch=1, heads=2, seq_len=65, kv_len=65, grid=(8, 8), spatial_start=1)
    m = BiLevelRouting(num_regions=2, topk=1)
    assert m.pattern(geo, 5) is None  # data-dependent without q/k
    q, k, v = qkv(1, 2, 65, 8)
    _, idx = visattn.functional.bilevel_routing_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], spatial_shape=(8, 8),
                                                          num_regions=2, topk=1, return_routing=True)
    row = m.pattern(geo, 1 + 0, q=q, k=k)  # grid token (0, 0) is in region 0
    assert row.dtype == torch.bool and row.shape == (65,)
    assert bool(row[0])  # the CLS key is global
    routed = int(idx[0, 0, 0])
    ys, xs = torch.arange(64) // 8, torch.arange(64) % 8
    expect = ((ys // 4) * 2 + xs // 4) == routed
    assert torch.equal(row[1:], expect)
    assert bool(m.pattern(geo, 0, q=q, k=k).all())  # the CLS query is global


def test_layout_stats():
    geo = TokenGeometry(batch=1, heads=2, seq_len=56 * 56, kv_len=56 * 56, grid=(56, 56))
    s = BiLevelRouting(num_regions=7, topk=4).layout_stats(geo)
    assert (s["strategy"], s["block"], s["full"], s["partial"], s["total"]) == ("aligned", 64, 196, 0, 2401)
    geo_cls = TokenGeometry(batch=1, heads=2, seq_len=65, kv_len=65, grid=(8, 8), spatial_start=1)
    s = BiLevelRouting(num_regions=2, topk=1).layout_stats(geo_cls)
    # 4 regions of 16 + CLS (kernel position 64, a ragged last block): each region block row has its routed
    # region FULL and the CLS block PARTIAL; the CLS row has the 4 region blocks FULL and its own block PARTIAL
    assert (s["full"], s["partial"]) == (4 + 4, 4 + 1)
    assert BiLevelRouting(num_regions=7, topk=4).layout_stats(geo_cls) is None  # does not fit -> dense
