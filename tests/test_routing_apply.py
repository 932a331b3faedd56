"""visattn.apply(..., "routing") on tiny timm ViTs and diffusers models, every call checked against the spec."""
import pytest
import torch

import visattn
from visattn.methods import BiLevelRouting
from visattn.methods import _routing_core as core

from _routing_ref import spec_reference


class Recording(BiLevelRouting):
    """BiLevelRouting that checks every routed call against the independent fp64 spec reference."""

    def attend(self, q, k, v, geometry, *, scale=None, attn_mask=None):
        out = super().attend(q, k, v, geometry, scale=scale, attn_mask=attn_mask)
        if self._grid(geometry) is not None:
            ref = spec_reference(q, k, v, geometry.grid, self.num_regions, self.topk, scale=scale,
                                 prefix=geometry.num_prefix, mask_padding=self.mask_padding).to(q.dtype)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            self.checked.append((geometry.layer, tuple(geometry.grid), geometry.num_prefix, geometry.num_suffix))
        return out


def _recording(**kw) -> Recording:
    m = Recording(**kw)
    object.__setattr__(m, "checked", [])
    return m


@pytest.mark.parametrize("img,grid", [((64, 96), (4, 6)), ((128, 128), (8, 8))])
def test_apply_timm_vit_cls_global(img, grid):
    from _tiny_models import tiny_vit
    vit = tiny_vit(img_size=img)
    x = torch.randn(2, 3, *img)
    with torch.no_grad():
        ref = vit(x)
        m = _recording(num_regions=2, topk=1)
        with visattn.apply(vit, m):
            out = vit(x)
        assert m.checked and all(c[1:] == (grid, 1, 0) for c in m.checked)
        assert not torch.allclose(out, ref, atol=1e-4)
        with visattn.apply(vit, "routing", num_regions=2, topk=4):  # topk = all regions: dense
            torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(vit(x), ref, atol=0, rtol=0)  # removed exactly


def test_apply_unet_levels_and_padding():
    from _tiny_models import tiny_unet, unet_inputs
    unet, inp = tiny_unet(), unet_inputs(hw=(8, 12))
    with torch.no_grad():
        ref = unet(**inp).sample
        m = _recording(num_regions=2, topk=2)
        with visattn.apply(unet, m) as h:
            out = unet(**inp).sample
            assert h.layers
        assert {c[1] for c in m.checked} == {(8, 12), (4, 6)}
        assert not torch.allclose(out, ref, atol=1e-3)
        # 3x3 regions on 8x12 / 4x6 pad the grid; masked padding keeps topk = all exact
        with visattn.apply(unet, "routing", num_regions=3, topk=9):
            torch.testing.assert_close(unet(**inp).sample, ref, atol=1e-5, rtol=0)
        m3 = _recording(num_regions=3, topk=4)
        with visattn.apply(unet, m3):
            unet(**inp)
        assert {c[1] for c in m3.checked} == {(8, 12)}  # 3 regions do not fit 4x6: that level runs dense


def test_apply_sd3_joint_attention_text_global():
    from _tiny_models import sd3_inputs, tiny_sd3
    model, inp = tiny_sd3(), sd3_inputs(hw=(8, 12))
    with torch.no_grad():
        m = _recording(num_regions=2, topk=2)
        with visattn.apply(model, m):
            model(**inp)
    assert m.checked and all(c[1] == (4, 6) and c[2] + c[3] == 5 for c in m.checked)


def test_layout_path_used_inside_models():
    """The ViT at 128x128 has 4x4-token regions: the aligned (all-FULL) layout path, not the dense fallback."""
    grid = core.make_region_grid((8, 8), 2)
    assert core.choose_strategy(grid, 65) == ("aligned", 16)
