"""timm adapter: ViT and Swin parity with Dense, geometry from patch_embed, exact removal, errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import pytest
import torch

import visattn
from visattn.methods import Dense

import _tiny_models as tm


@dataclass
class Recorder(Dense):
    log: List = field(default_factory=list, compare=False, repr=False)

    def attend(self, q, k, v, geometry, *, scale=None, attn_mask=None):
        self.log.append((geometry, None if attn_mask is None else tuple(attn_mask.shape)))
        return super().attend(q, k, v, geometry, scale=scale, attn_mask=attn_mask)


def _check_parity_and_restore(model, x, expected_layers):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        rec = Recorder()
        with visattn.apply(model, rec) as h:
            assert len(h.layers) == expected_layers
            out = model(x)
        after = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(after, ref)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()) and model.state_dict().keys() == sd.keys()
    for m in model.modules():
        assert "forward" not in m.__dict__ and "_visattn_ctx" not in m.__dict__
    assert not model._forward_pre_hooks
    return rec


def test_vit_non_square_parity_and_geometry():
    model = tm.tiny_vit(img_size=(32, 48))
    rec = _check_parity_and_restore(model, torch.randn(2, 3, 32, 48), expected_layers=2)
    geos = [g for g, _ in rec.log]
    assert len(geos) == 2 and all(g.grid == (2, 3) and g.spatial_start == 1 and g.seq_len == 7 for g in geos)
    assert geos[0].layer == "blocks.0.attn" and geos[0].heads == 3 and geos[0].step is None


def test_vit_registers_and_dynamic_size():
    model = tm.tiny_vit(img_size=(32, 32), reg_tokens=2, dynamic_img_size=True)
    rec = Recorder()
    with torch.no_grad(), visattn.apply(model, rec):
        model(torch.randn(1, 3, 48, 64))
    g = rec.log[0][0]
    assert g.grid == (3, 4) and g.spatial_start == 3 and g.seq_len == 15  # cls + 2 registers first


def test_vit_full_depth_parity():
    model = tm.tiny_vit(img_size=(32, 32), depth=12)
    _check_parity_and_restore(model, torch.randn(1, 3, 32, 32), expected_layers=12)


def test_swin_window_geometry_and_mask():
    model = tm.tiny_swin(img_size=64)
    rec = _check_parity_and_restore(model, torch.randn(2, 3, 64, 64), expected_layers=4)
    geos = [g for g, _ in rec.log]
    assert all(g.grid == (4, 4) and g.seq_len == 16 for g in geos)
    assert [g.batch for g in geos] == [2 * 16, 2 * 16, 2 * 4, 2 * 4]  # (B * windows): 16x16 then 8x8 tokens
    # relative-position bias (+ shift mask in shifted blocks) arrives as a per-window-batch additive mask
    assert all(shape is not None and shape[-2:] == (16, 16) for _, shape in rec.log)


def test_timm_layer_filters_and_errors():
    model = tm.tiny_vit()
    with visattn.apply(model, "dense", layers=r"blocks\.1\.") as h:
        assert h.layers == ["blocks.1.attn"]
    with pytest.raises(ValueError, match="selects no attention module of VisionTransformer"):
        visattn.apply(model, "dense", layers="cross")
    pooled = tm.tiny_vit(global_pool="map")  # AttentionPoolLatent: an attention visattn does not drive
    with pytest.raises(ValueError, match="attn_pool \\(AttentionPoolLatent\\).*Supported: timm.layers"):
        visattn.apply(pooled, "dense", layers="all")
    with visattn.apply(pooled, "dense") as h:  # "self" leaves the pooling (counted as cross) alone
        assert len(h.layers) == 2
    with pytest.raises(TypeError, match="no timm attention modules"):
        import timm

        visattn.apply(timm.create_model("resnet10t", pretrained=False), "dense")


def test_causal_flag_becomes_mask():
    model = tm.tiny_vit()
    attn = model.blocks[0].attn
    x = torch.randn(1, 7, 192)
    with torch.no_grad():
        ref = attn(x, is_causal=True)
        with visattn.apply(model, "dense"):
            out = attn(x, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
