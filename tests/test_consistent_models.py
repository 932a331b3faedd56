"""Consistent attention through visattn.apply: SDXL-style UNet (non-square), SD3 and Flux joint attention."""
import pytest
import torch

import visattn
from visattn.methods import Consistent

from _tiny_models import flux_inputs, sd3_inputs, sdxl_unet_inputs, tiny_flux, tiny_sd3, tiny_sdxl_unet

ON = dict(gate=(1.0, 1.0), first_step_plain=False)


def _out(model, kw):
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def test_sdxl_unet_non_square_sharing_and_cfg_isolation():
    unet = tiny_sdxl_unet()
    kw = sdxl_unet_inputs(hw=(8, 12), batch=4)  # [uncond0, uncond1, cond0, cond1]
    ref = _out(unet, kw)
    m0 = Consistent(sample_rate=0.0, **ON)
    with visattn.apply(unet, m0, layers=m0.layer_filter(), cfg_chunks=2):
        torch.testing.assert_close(_out(unet, kw), ref, atol=1e-5, rtol=1e-5)
    m = Consistent(sample_rate=1.0, **ON)
    with visattn.apply(unet, m, layers=m.layer_filter(), cfg_chunks=2) as h:
        assert h.layers and all(n.startswith("up_blocks") and n.endswith("attn1") for n in h.layers)
        out = _out(unet, kw)
        kw2 = dict(kw, sample=kw["sample"].clone())
        kw2["sample"][3] += 1.0  # change cond image 1 only
        out2 = _out(unet, kw2)
    assert m.stats["csa_calls"] > 0
    assert not torch.allclose(out[2], ref[2], atol=1e-4)  # sharing changes the result
    torch.testing.assert_close(out2[:2], out[:2], atol=0, rtol=0)  # uncond half never sees the cond half
    assert not torch.allclose(out2[2], out[2], atol=1e-5)  # cond image 0 sees cond image 1


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_shares_image_tokens_only(family):
    if family == "sd3":
        model, kw = tiny_sd3(), sd3_inputs(hw=(8, 12), batch=2)
        img_key, first = "hidden_states", "transformer_blocks.0."
    else:
        model, kw = tiny_flux(), flux_inputs(grid=(3, 5), batch=2)
        img_key, first = "hidden_states", "transformer_blocks.0."
    ref = _out(model, kw)
    m0 = Consistent(sample_rate=0.0, layers="all", **ON)
    with visattn.apply(model, m0, layers=lambda n: n.startswith(first)):
        torch.testing.assert_close(_out(model, kw), ref, atol=1e-5, rtol=1e-5)
    m = Consistent(sample_rate=1.0, layers="all", **ON)
    with visattn.apply(model, m, layers=lambda n: n.startswith(first), cfg_chunks=1):
        out = _out(model, kw)
        text = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"].clone())
        text["encoder_hidden_states"][1] += 1.0  # image 1's text: never shared in the first block
        out_text = _out(model, text)
        img = dict(kw, **{img_key: kw[img_key].clone()})
        img[img_key][1] += 1.0  # image 1's image tokens: shared with image 0
        out_img = _out(model, img)
    assert m.stats["csa_calls"] > 0
    assert not torch.allclose(out[0], ref[0], atol=1e-5)
    torch.testing.assert_close(out_text[0], out[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out_img[0], out[0], atol=1e-5)
