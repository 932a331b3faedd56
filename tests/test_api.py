"""Public API: apply/remove/Handle on a pipeline, step/CFG/seed capture, layer filters, registry errors."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List

import numpy as np
import pytest
import torch

import visattn
from visattn.methods import Dense, base as methods_base
from visattn.adapters.diffusers_processors import VisProcessor

import _tiny_models as tm


@dataclass
class Recorder(Dense):
    """Dense attention that records geometries and counts resets."""

    log: List = field(default_factory=list, compare=False, repr=False)
    resets: List = field(default_factory=list, compare=False, repr=False)

    def attend(self, q, k, v, geometry, *, scale=None, attn_mask=None):
        self.log.append(geometry)
        return super().attend(q, k, v, geometry, scale=scale, attn_mask=attn_mask)

    def reset(self) -> None:
        self.resets.append(1)


@pytest.fixture(scope="module")
def pipe():
    return tm.tiny_sd_pipeline()


def _run(pipe, **kw):
    with torch.no_grad():
        return pipe(**tm.pipeline_kwargs(**kw)).images


def test_pipeline_dense_equal_and_exact_restore(pipe):
    procs = dict(pipe.unet.attn_processors)
    sd = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ref = _run(pipe)
    with visattn.apply(pipe, "dense", layers="all") as h:
        assert isinstance(h, visattn.Handle) and h.active and len(h.layers) == 8
        assert "set_timesteps" in pipe.scheduler.__dict__
        out = _run(pipe)
    assert not h.active
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert all(pipe.unet.attn_processors[k] is v for k, v in procs.items())
    assert "set_timesteps" not in pipe.scheduler.__dict__ and "forward" not in pipe.unet.__dict__
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in sd.items())
    assert np.array_equal(_run(pipe), ref)


def test_steps_cfg_seed_non_square(pipe):
    rec = Recorder()
    with visattn.apply(pipe, rec) as h:
        _run(pipe, steps=3, height=32, width=48, seed=7)
        first = list(rec.log)
        rec.log.clear()
        _run(pipe, steps=2, height=32, width=48, seed=7, guidance_scale=1.0)
        second = list(rec.log)
        rec.log.clear()
        _run(pipe, steps=2, height=32, width=48, seed=8)
        third = list(rec.log)
    assert h.state.run_index == 3 and len(rec.resets) >= 4  # once at apply + once per run
    # latents 16x24 (VAE x2): level 0 (16, 24), level 1 (8, 12); 4 self-attention layers per call
    assert {g.grid for g in first} == {(16, 24), (8, 12)}
    assert [g.step for g in first] == [0] * 4 + [1] * 4 + [2] * 4
    assert {g.num_steps for g in first} == {3} and {g.cfg_chunks for g in first} == {2}
    assert all(g.batch == 2 for g in first)
    ts = [g.timestep for g in first[::4]]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 3
    assert [g.timestep for g in third[::4]] == [float(t) for t in pipe.scheduler.timesteps]  # the schedule's
    assert [g.step for g in second] == [0] * 4 + [1] * 4 and {g.cfg_chunks for g in second} == {1}
    assert {g.batch for g in second} == {1}
    assert len({g.seed for g in first}) == 1 and first[0].seed == second[0].seed  # same generator seed
    assert third[0].seed != first[0].seed
    r1, r2 = first[0].rng(), first[0].rng()
    assert torch.equal(torch.rand(3, generator=r1), torch.rand(3, generator=r2))
    assert not torch.equal(torch.rand(3, generator=first[0].rng()), torch.rand(3, generator=first[4].rng()))


def test_step_reset_by_timestep_without_pipeline():
    unet = tm.tiny_unet()
    rec = Recorder()
    inp = tm.unet_inputs(batch=1)
    with visattn.apply(unet, rec), torch.no_grad():
        for t in (900.0, 500.0, 500.0, 100.0, 900.0):
            unet(**{**inp, "timestep": torch.tensor(t)})
    steps = [g.step for g in rec.log[::4]]  # 4 self-attention layers per call
    assert steps == [0, 1, 1, 2, 0]
    assert {g.num_steps for g in rec.log} == {None}


def test_context_manager_double_apply_and_remove(pipe):
    unet = pipe.unet
    procs = dict(unet.attn_processors)
    h1 = visattn.apply(pipe, "dense")
    first = {k: v for k, v in unet.attn_processors.items() if isinstance(v, VisProcessor)}
    rec = Recorder()
    h2 = visattn.apply(unet, rec, layers="all")  # replaces h1 (same denoiser)
    assert not h1.active and h2.active
    now = unet.attn_processors
    assert all(isinstance(p, VisProcessor) and p.ctx.method is rec for p in now.values())
    assert all(now[k] is not first[k] for k in first)
    assert all(p.original is procs[k] for k, p in now.items())  # wraps the stock ones, not h1's
    assert visattn.api.active_handle(unet) is h2
    assert visattn.remove(pipe) is True and not h2.active
    assert visattn.remove(pipe) is False
    assert all(unet.attn_processors[k] is v for k, v in procs.items())
    h1.remove()  # idempotent
    with visattn.apply(pipe, "dense") as h3:
        assert h3.active
    assert all(unet.attn_processors[k] is v for k, v in procs.items())
    assert "forward" not in unet.__dict__ and not hasattr(unet, "_diffusers_hook")


def test_layer_filters():
    unet = tm.tiny_unet()
    names = lambda **kw: visattn.apply(unet, "dense", **kw).layers  # noqa: E731
    self_layers, cross_layers, all_layers = names(), names(layers="cross"), names(layers="all")
    assert self_layers and all(n.endswith("attn1") for n in self_layers)
    assert cross_layers and all(n.endswith("attn2") for n in cross_layers)
    assert sorted(all_layers) == sorted(self_layers + cross_layers)
    up = names(layers=r"^up_blocks.*attn1$")
    assert up and all(n.startswith("up_blocks") and n.endswith("attn1") for n in up)
    assert names(layers=re.compile("mid_block")) == [n for n in all_layers if "mid_block" in n]
    assert names(layers=lambda n: n.startswith("down_blocks")) == [n for n in all_layers if n.startswith("down")]
    with pytest.raises(ValueError, match="selects no attention module"):
        visattn.apply(unet, "dense", layers="nothing_matches_this")
    with pytest.raises(ValueError, match="valid regex"):
        visattn.apply(unet, "dense", layers="(")
    with pytest.raises(TypeError, match="layers must be"):
        visattn.apply(unet, "dense", layers=3)
    visattn.remove(unet)
    assert not any(isinstance(p, VisProcessor) for p in unet.attn_processors.values())


def test_method_and_option_errors():
    unet = tm.tiny_unet()
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known methods: \[.*'dense'"):
        visattn.apply(unet, "nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kernel'\] for method 'dense'"):
        visattn.apply(unet, "dense", kernel=3)
    with pytest.raises(TypeError, match="registered name"):
        visattn.apply(unet, 3)
    with pytest.raises(ValueError, match="cfg_chunks"):
        visattn.apply(unet, "dense", cfg_chunks=0)
    assert not any(isinstance(p, VisProcessor) for p in unet.attn_processors.values())  # nothing installed


def test_register_method_open_registry():
    @visattn.register_method("_test_tmp_method")
    @dataclass
    class Tmp(Dense):
        width: int = 2

    try:
        assert "_test_tmp_method" in visattn.list_methods()
        unet = tm.tiny_unet()
        with visattn.apply(unet, "_test_tmp_method", width=5) as h:
            assert isinstance(h.method, Tmp) and h.method.width == 5
        with pytest.raises(ValueError, match="allowed: \\['width'\\]"):
            visattn.apply(unet, "_test_tmp_method", height=1)
    finally:
        methods_base._REGISTRY.pop("_test_tmp_method", None)


def test_cli_writes_png(tmp_path, capsys):
    from PIL import Image

    from visattn import cli

    out = tmp_path / "x.png"
    assert cli.main(["--method", "dense", "--out", str(out), "--size", "32", "48", "--steps", "1"]) == 0
    assert Image.open(out).size == (48, 32)
    assert "dense: 32x48 (HxW) image, 1 steps" in capsys.readouterr().out
    assert cli.parse_options(["a=1", "b=(3, 3)", "c=name"]) == {"a": 1, "b": (3, 3), "c": "name"}
    assert cli.main(["--method", "dense", "--option", "bogus=1", "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--method", "no_such_method", "--out", str(out)])


def test_flux_pipeline_geometry_and_parity():
    pipe = tm.tiny_flux_pipeline()
    with torch.no_grad():
        ref = pipe(**tm.flux_pipeline_kwargs()).images
        rec = Recorder()
        with visattn.apply(pipe, rec) as h:
            n_layers = len(h.layers)
            out = pipe(**tm.flux_pipeline_kwargs()).images
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert n_layers == 2 and len(rec.log) == 4  # double + single block, 2 steps
    # 24x40 image, VAE x2, packed 2x2 -> 6x10 tokens after the 5 text tokens; no batched CFG
    assert all(g.grid == (6, 10) and g.spatial_start == 5 and g.seq_len == 65 for g in rec.log)
    assert [g.step for g in rec.log] == [0, 0, 1, 1] and {g.num_steps for g in rec.log} == {2}
    assert {g.cfg_chunks for g in rec.log} == {1} and rec.log[0].seed is not None
    assert "set_timesteps" not in pipe.scheduler.__dict__


def test_applied_model_can_be_collected():
    import gc
    import weakref

    unet = tm.tiny_unet()
    visattn.apply(unet, "dense")  # never removed
    ref = weakref.ref(unet)
    del unet
    gc.collect()
    assert ref() is None
