"""diffusers adapter: Dense through our processors equals the stock model; exact removal; geometry capture."""
from __future__ import annotations


import pytest
import torch

import visattn
from visattn.methods import Dense

import _tiny_models as tm

FAMILIES = {  # name: (builder, inputs builder, expected number of self / cross layers)
    "sd15_unet": (tm.tiny_unet, tm.unet_inputs, 4, 4),
    "sdxl_unet": (tm.tiny_sdxl_unet, tm.sdxl_unet_inputs, 8, 8),
    "sd3": (tm.tiny_sd3, tm.sd3_inputs, 2, 0),
    "flux": (tm.tiny_flux, tm.flux_inputs, 2, 0),
    "wan": (tm.tiny_wan, tm.wan_inputs, 2, 2),
    "cogvideox": (tm.tiny_cogvideox, tm.cogvideox_inputs, 1, 0),
}


Recorder = tm.GeometryRecorder


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, inputs, n_self, n_cross = FAMILIES[request.param]
    return request.param, build(), inputs(), n_self, n_cross


def test_dense_matches_stock_and_remove_is_exact(family):
    name, model, inputs, n_self, n_cross = family
    procs = dict(model.attn_processors)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _out(model, inputs)
    with visattn.apply(model, Dense(), layers="all") as h:
        assert len(h.layers) == n_self + n_cross
        out = _out(model, inputs)
        assert all(type(p).__module__ == "visattn.adapters.diffusers_processors" for p in
                   (model.attn_processors[n + ".processor"] for n in h.layers))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    after = model.attn_processors
    assert all(after[k] is procs[k] for k in procs), "original processor objects must come back"
    assert "forward" not in model.__dict__ and not hasattr(model, "_diffusers_hook")
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    assert torch.equal(_out(model, inputs), ref)


def test_self_cross_split(family):
    name, model, inputs, n_self, n_cross = family
    with visattn.apply(model, "dense") as h:
        assert len(h.layers) == n_self
    if n_cross:
        with visattn.apply(model, "dense", layers="cross") as h:
            assert len(h.layers) == n_cross
    else:
        with pytest.raises(ValueError, match="selects no attention module"):
            visattn.apply(model, "dense", layers="cross")


def test_unet_levels_non_square():
    model = tm.tiny_unet()
    rec = Recorder()
    with visattn.apply(model, rec, layers="all"):
        _out(model, tm.unet_inputs(hw=(8, 12)))
    grids = {(g.layer.split(".")[0], g.is_cross): g.grid for g in rec.log}
    assert grids[("down_blocks", False)] == (8, 12) and grids[("down_blocks", True)] == (8, 12)
    assert grids[("mid_block", False)] == (4, 6)
    assert all(g.base_grid == (8, 12) and g.spatial_start == 0 and g.timestep == 500.0 for g in rec.log)
    assert all(g.kv_len == (7 if g.is_cross else g.seq_len) for g in rec.log)
    assert {g.cfg_chunks for g in rec.log} == {1}  # two different latents: no CFG repeat


def test_unet_cfg_detected_from_repeated_latents():
    model = tm.tiny_unet()
    inp = tm.unet_inputs(batch=1)
    inp["sample"] = inp["sample"].repeat(2, 1, 1, 1)
    inp["encoder_hidden_states"] = torch.randn(2, 7, 32)
    rec = Recorder()
    with visattn.apply(model, rec):
        _out(model, inp)
    assert {g.cfg_chunks for g in rec.log} == {2}
    rec.log.clear()
    with visattn.apply(model, rec, cfg_chunks=1):
        _out(model, inp)
    assert {g.cfg_chunks for g in rec.log} == {1}


@pytest.mark.parametrize("name,grid,start", [("sd3", (4, 6), 0), ("flux", (3, 5), 5), ("wan", (3, 4, 6), 0),
                                             ("cogvideox", (2, 4, 6), 6)])
def test_transformer_grids(name, grid, start):
    build, inputs, *_ = FAMILIES[name]
    model = build()
    rec = Recorder()
    with visattn.apply(model, rec):
        _out(model, inputs())
    assert rec.log and all(g.grid == grid and g.spatial_start == start for g in rec.log)
    joint = name in ("sd3", "flux", "cogvideox")
    assert all((g.num_extra > 0) == joint for g in rec.log)


def test_vae_4d_inputs():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        ref = vae(x, return_dict=False)[0]
        rec = Recorder()
        with visattn.apply(vae, rec):
            out = vae(x, return_dict=False)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert len(rec.log) == 2 and {g.grid for g in rec.log} == {(8, 12)}  # encoder + decoder mid-block, 4-D input


def test_unsupported_processor_named():
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    model = tm.tiny_unet()
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    model.set_attn_processor({**model.attn_processors, key: AttnAddedKVProcessor()})
    with pytest.raises(ValueError, match="AttnAddedKVProcessor.*Supported: attention processors"):
        visattn.apply(model, "dense")
    with visattn.apply(model, "dense", layers=r"^up_blocks") as h:  # restricting the layers avoids it
        assert h.layers and all(n.startswith("up_blocks") for n in h.layers)


def test_unsupported_target_type():
    with pytest.raises(TypeError, match="Linear.*expected a diffusers DiffusionPipeline"):
        visattn.apply(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(TypeError, match="str"):
        visattn.apply("unet", "dense")
