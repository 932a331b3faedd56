"""The "neighborhood" method (geometry, clipping, extra tokens, pattern), nn modules, and visattn.apply use."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn import TokenGeometry
from visattn.functional import neighborhood_attention
from visattn.kernels import masked_attention
from visattn.methods import Neighborhood
from visattn.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

from test_neighborhood import oracle_mask

F64 = dict(atol=1e-12, rtol=0)


def qkv(B, H, N, D, Hkv=None):
    q = torch.randn(B, H, N, D, dtype=torch.float64)
    k, v = torch.randn(2, B, Hkv or H, N, D, dtype=torch.float64).unbind(0)
    return q, k, v


def test_registered_and_options():
    assert "neighborhood" in visattn.list_methods()
    m = visattn.get_method("neighborhood", kernel_size=(3, 5), stride=2)
    assert isinstance(m, Neighborhood) and m.kernel_size == (3, 5) and m.stride == 2
    with pytest.raises(ValueError, match=">= 2"):
        Neighborhood(kernel_size=1)
    with pytest.raises(TypeError, match="kernel_size"):
        Neighborhood(kernel_size=2.5)


@pytest.mark.parametrize("grid,prefix,suffix,kern,dil,stride,causal", [
    ((8, 8), 1, 0, 3, 1, 1, False),                     # ViT CLS token
    ((6, 7), 0, 5, (3, 4), (2, 1), (1, 2), False),      # joint attention: text after the image (SD3)
    ((5, 6), 4, 0, 4, 1, 2, (True, False)),             # text first (Flux)
    ((3, 5, 6), 2, 1, (2, 3, 3), 1, 1, (True, False, False)),  # video, causal in time
])
def test_method_matches_oracle_with_extra_tokens(grid, prefix, suffix, kern, dil, stride, causal):
    n = prefix + math.prod(grid) + suffix
    q, k, v = qkv(2, 4, n, 8, Hkv=2)
    geo = TokenGeometry(batch=2, heads=4, seq_len=n, kv_len=n, grid=grid, spatial_start=prefix)
    m = Neighborhood(kernel_size=kern, dilation=dil, stride=stride, is_causal=causal, block_size=16)
    out = m(q, k, v, geo, scale=0.4)
    nd = len(grid)
    tup = lambda x: x if isinstance(x, tuple) else (x,) * nd  # noqa: E731
    mask = oracle_mask(grid, tup(kern), tup(dil), tup(stride), tup(causal), prefix, suffix)
    torch.testing.assert_close(out, masked_attention(q, k, v, mask, scale=0.4), **F64)
    # pattern() gives the same rows
    for qi in (0, prefix, n - 1, n // 2):
        assert torch.equal(m.pattern(geo, qi), mask[qi])
    st = m.layout_stats(geo)
    assert st["full"] + st["partial"] + st["empty"] == st["total"]


def test_kernel_clipped_at_small_levels_is_dense():
    q, k, v = qkv(1, 2, 4 * 6, 8)
    geo = TokenGeometry(batch=1, heads=2, seq_len=24, kv_len=24, grid=(4, 6))
    m = Neighborhood(kernel_size=13, dilation=2, stride=4)
    torch.testing.assert_close(m(q, k, v, geo), F.scaled_dot_product_attention(q, k, v), **F64)
    assert m.spec_for(geo) is None and m.layout_stats(geo) is None
    # partly clipped: the kernel spans the short axis only
    geo2 = TokenGeometry(batch=1, heads=2, seq_len=4 * 16, kv_len=64, grid=(4, 16))
    q, k, v = qkv(1, 2, 64, 8)
    spec = m.spec_for(geo2)
    assert spec.kernel == (4, 13) and spec.dilation == (1, 1) and spec.stride == (4, 4)
    mask = oracle_mask((4, 16), (4, 13), (1, 1), (4, 4), (False, False))
    torch.testing.assert_close(m(q, k, v, geo2), masked_attention(q, k, v, mask), **F64)


def test_no_grid_cross_attention_are_dense():
    m = Neighborhood(kernel_size=3)
    q, k, v = qkv(1, 2, 16, 8)
    geo = TokenGeometry(batch=1, heads=2, seq_len=16, kv_len=16)
    torch.testing.assert_close(m(q, k, v, geo), F.scaled_dot_product_attention(q, k, v), **F64)
    assert bool(m.pattern(geo, 3).all())
    kc, vc = torch.randn(2, 1, 2, 7, 8, dtype=torch.float64).unbind(0)
    geo_x = TokenGeometry(batch=1, heads=2, seq_len=16, kv_len=7, grid=(4, 4), is_cross=True)
    torch.testing.assert_close(m(q, kc, vc, geo_x), F.scaled_dot_product_attention(q, kc, vc), **F64)


def test_attn_mask_combined_with_window():
    q, k, v = qkv(2, 2, 49, 8)
    geo = TokenGeometry(batch=2, heads=2, seq_len=49, kv_len=49, grid=(7, 7))
    bias = torch.randn(1, 2, 49, 49, dtype=torch.float64)
    out = Neighborhood(kernel_size=3)(q, k, v, geo, attn_mask=bias)
    mask = oracle_mask((7, 7), (3, 3), (1, 1), (1, 1), (False, False))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~mask, float("-inf")))
    torch.testing.assert_close(out, ref, **F64)


def test_grid_dims_mismatch_errors():
    q, k, v = qkv(1, 1, 24, 8)
    geo = TokenGeometry(batch=1, heads=1, seq_len=24, kv_len=24, grid=(2, 3, 4))
    with pytest.raises(ValueError, match="3 axes"):
        Neighborhood(kernel_size=(3, 3))(q, k, v, geo)


# ---------------------------------------------------------------- nn modules
@pytest.mark.parametrize("cls,shape,kern,dil,causal", [
    (NeighborhoodAttention1D, (23,), 5, 2, True),
    (NeighborhoodAttention2D, (9, 11), (3, 4), (2, 1), False),
    (NeighborhoodAttention3D, (3, 6, 5), (2, 3, 3), 1, (True, False, False)),
])
def test_modules_match_functional(cls, shape, kern, dil, causal):
    m = cls(32, 4, kern, dilation=dil, is_causal=causal, block_size=16).double()
    x = torch.randn(2, *shape, 32, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    B, N = 2, math.prod(shape)
    q, k, v = m.qkv(x.reshape(B, N, 32)).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    o = neighborhood_attention(q, k, v, spatial_shape=shape, kernel_size=kern, dilation=dil, is_causal=causal,
                               backend="sdpa")
    ref = m.proj(o.transpose(1, 2).reshape(B, N, 32)).reshape(y.shape)
    torch.testing.assert_close(y, ref, **F64)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gr, atol=1e-10, rtol=0)
    assert set(n for n, _ in m.named_parameters()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def test_module_full_kernel_is_dense_and_errors():
    m = NeighborhoodAttention2D(16, 2, (4, 5)).double()
    x = torch.randn(1, 4, 5, 16, dtype=torch.float64)
    q, k, v = m.qkv(x.reshape(1, 20, 16)).reshape(1, 20, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    ref = m.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 20, 16)).reshape(x.shape)
    torch.testing.assert_close(m(x), ref, **F64)
    with pytest.raises(ValueError, match="cannot exceed"):
        m(torch.randn(1, 3, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="expects"):
        m(torch.randn(1, 20, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodAttention2D(16, 2, 3, stride=4)
    with pytest.raises(ValueError, match="divisible"):
        NeighborhoodAttention1D(10, 3, 3)


# ---------------------------------------------------------------- visattn.apply on tiny models
class Recording(Neighborhood):
    """Neighborhood that checks every sparse call against the independent oracle."""

    def attend(self, q, k, v, geometry, *, scale=None, attn_mask=None):
        out = super().attend(q, k, v, geometry, scale=scale, attn_mask=attn_mask)
        spec = self.spec_for(geometry)
        if spec is not None and attn_mask is None:
            mask = oracle_mask(spec.shape, spec.kernel, spec.dilation, spec.stride, spec.causal, spec.prefix,
                               spec.suffix)
            ref = masked_attention(q.double(), k.double(), v.double(), mask, scale=scale).to(q.dtype)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            self.checked.append((geometry.layer, spec.shape, spec.prefix, spec.suffix))
        return out


def _recording(**kw):
    import dataclasses
    m = Recording(**kw)
    object.__setattr__(m, "checked", [])
    assert dataclasses.is_dataclass(m)
    return m


def test_apply_unet_every_level():
    from _tiny_models import tiny_unet, unet_inputs
    unet, inp = tiny_unet(), unet_inputs(hw=(8, 12))
    with torch.no_grad():
        ref = unet(**inp).sample
        m = _recording(kernel_size=3)
        with visattn.apply(unet, m) as h:
            out = unet(**inp).sample
            assert len(h.layers) == 4
        assert {c[1] for c in m.checked} == {(8, 12), (4, 6)}  # level 0 and the mid block
        assert not torch.allclose(out, ref, atol=1e-3)
        # a kernel bigger than every level clips to dense: identical to the untouched model
        with visattn.apply(unet, "neighborhood", kernel_size=13):
            torch.testing.assert_close(unet(**inp).sample, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(unet(**inp).sample, ref, atol=0, rtol=0)  # removed exactly


def test_apply_timm_vit_keeps_cls_global():
    from _tiny_models import tiny_vit
    vit = tiny_vit(img_size=(64, 96))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = vit(x)
        m = _recording(kernel_size=3)
        with visattn.apply(vit, m):
            out = vit(x)
        assert m.checked and all(c[1:] == ((4, 6), 1, 0) for c in m.checked)
        assert not torch.allclose(out, ref, atol=1e-4)
        with visattn.apply(vit, "neighborhood", kernel_size=(4, 6)):
            torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=0)


def test_apply_sd3_joint_attention_text_global():
    from _tiny_models import sd3_inputs, tiny_sd3
    model, inp = tiny_sd3(), sd3_inputs(hw=(8, 12))
    with torch.no_grad():
        m = _recording(kernel_size=2)
        with visattn.apply(model, m):
            model(**inp)
    assert m.checked and all(c[1] == (4, 6) and c[2] + c[3] == 5 for c in m.checked)


def test_apply_wan_video_3d():
    from _tiny_models import tiny_wan, wan_inputs
    model, inp = tiny_wan(), wan_inputs(fhw=(3, 8, 12))
    with torch.no_grad():
        m = _recording(kernel_size=(2, 3, 3), is_causal=(True, False, False))
        with visattn.apply(model, m):
            model(**inp)
    assert m.checked and all(len(c[1]) == 3 for c in m.checked)


def test_presets_are_valid():
    from visattn.methods.neighborhood import PRESETS
    for name in PRESETS:
        m = Neighborhood.preset(name)
        nd = len(m.kernel_size) if isinstance(m.kernel_size, tuple) else 2
        grid = (30, 48, 80) if nd == 3 else (128, 128)
        geo = TokenGeometry(batch=1, heads=1, seq_len=math.prod(grid), kv_len=math.prod(grid), grid=grid)
        assert m.spec_for(geo) is not None
    assert Neighborhood.preset("flux", stride=1).stride == 1
    with pytest.raises(ValueError, match="known presets"):
        Neighborhood.preset("nope")


def test_apply_timm_swin_with_relative_position_bias():
    from _tiny_models import tiny_swin
    model = tiny_swin()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with visattn.apply(model, "neighborhood", kernel_size=3) as h:
            out = model(x)
            assert h.layers
        assert not torch.allclose(out, ref, atol=1e-4)
        # a kernel covering each Swin window is the model's own windowed attention, bias included
        with visattn.apply(model, "neighborhood", kernel_size=64):
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
