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
    assert all(not m._forward_pre_hooks for m in model.modules())
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


def _tiny_eva(**kw):
    from timm.models.eva import Eva

    torch.manual_seed(0)
    args = dict(img_size=(32, 48), patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                use_rot_pos_emb=True, qkv_bias=True)
    args.update(kw)
    return Eva(**args).eval()


@pytest.mark.parametrize("kw", [{}, dict(qkv_fused=False), dict(attn_type="rope", num_reg_tokens=2),
                                dict(attn_type="rope", qkv_fused=False, num_kv_heads=1)],
                         ids=["eva", "eva-unfused", "attention-rope-registers", "attention-rope-gqa"])
def test_eva_and_rope_attention_parity_and_geometry(kw):
    """EVA (EvaAttention, q/v-only bias) and timm's AttentionRope (registers, GQA): the rotary embedding is applied
    before the method, Dense equals the model, remove() restores it, and the grid is the patch grid."""
    try:
        model = _tiny_eva(**kw)
    except TypeError as e:  # an older timm without this option
        pytest.skip(f"timm Eva does not take {kw}: {e}")
    for blk in model.blocks:  # non-zero q/v biases so that the bias path is exercised
        for name in ("q_bias", "v_bias"):
            if getattr(blk.attn, name, None) is not None:
                torch.nn.init.normal_(getattr(blk.attn, name), std=0.1)
    rec = _check_parity_and_restore(model, torch.randn(2, 3, 32, 48), expected_layers=2)
    g = rec.log[0][0]
    assert g.grid == (4, 6) and g.spatial_start == model.num_prefix_tokens and g.seq_len == 24 + g.spatial_start
    assert g.head_dim == 16  # 48 channels / 3 heads


def test_eva_neighborhood_full_kernel_is_dense_and_small_kernel_is_local():
    """Neighborhood attention on EVA: a kernel covering the grid equals the model's features; a 3x3 window
    changes them (the prefix token stays global, so the features stay finite and of the same shape)."""
    from visattn.methods import Neighborhood

    model = _tiny_eva()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        ref = model.forward_features(x)
        with visattn.apply(model, Neighborhood(kernel_size=(4, 6))):
            full = model.forward_features(x)
        with visattn.apply(model, Neighborhood(kernel_size=3)):
            local = model.forward_features(x)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
    rel = ((local - ref).norm() / ref.norm()).item()
    assert local.shape == ref.shape and torch.isfinite(local).all() and rel > 1e-3, rel  # 0.0 if not applied
