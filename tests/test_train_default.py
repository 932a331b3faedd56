"""The default model's training script (issue 9): a tiny CPU run exports a loadable pipeline with its config,
and a rerun with the same folder resumes from the stage checkpoints instead of training again."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from visattn.pipelines import train_default as td


def test_snr_weight_keeps_high_noise_and_downweights_low_noise():
    alpha_bar = torch.tensor([4e-5, 0.5, 0.9, 0.9999])
    w = td.snr_weight(alpha_bar, 5.0)
    snr_plus_one = 1 / (1 - alpha_bar)
    torch.testing.assert_close(w, snr_plus_one.clamp(max=5.0) / snr_plus_one)
    assert w[0] == 1.0 and w[1] == 1.0 and w[2] == pytest.approx(0.5) and w[3] < 1e-3
    assert torch.equal(td.snr_weight(alpha_bar, 0.0), torch.ones(4))


def test_to_device_async_on_cpu_is_a_plain_copy():
    x = torch.arange(5)
    y = td.to_device_async(x, torch.device("cpu"))
    assert torch.equal(x, y)


@pytest.mark.slow
def test_tiny_training_run_exports_and_resumes(tmp_path, one_thread):
    cfg = td.TrainConfig(**{**td.PRESETS["tiny"], "n256": 0, "n512": 0, "res_cycle": (128,), "unet_steps": 3,
                            "vae_steps": 2, "clf_steps": 2, "clf_n": 32})
    folder = td.run(cfg, tmp_path, torch.device("cpu"), workers=1)
    saved = json.loads((folder / "train_config.json").read_text())
    assert saved["seed"] == 0 and saved["config"]["unet_steps"] == 3 and saved["unet_steps_done"] == 3
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    assert (tmp_path / "state" / "unet.done").exists() and (tmp_path / "state" / "vae.done").exists()

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert list(pipe.unet.config.block_out_channels) == [32, 32, 32]

    log_before = (tmp_path / "train_log.txt").read_text()
    td.run(cfg, tmp_path, torch.device("cpu"), workers=1)
    log_after = (tmp_path / "train_log.txt").read_text()[len(log_before):]
    assert "vae: done (resumed)" in log_after and "unet: done (resumed)" in log_after
    assert "classifier: done (resumed)" in log_after


def _tiny_trainer(device: torch.device, graphs: bool):
    from diffusers import DDPMScheduler

    from visattn.pipelines.default_model import build_components

    cfg = td.TrainConfig(**{**td.PRESETS["tiny"], "unet_batch": 4, "cuda_graphs": graphs})
    comps = build_components(0, unet=cfg.unet, vae=cfg.vae, text=cfg.text)
    unet, te = comps["unet"].to(device).train(), comps["text_encoder"].to(device).train()
    ema_u, ema_t = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    lat = {128: torch.randn(16, 4, 32, 32, generator=gen).to(device)}
    ids = {128: td.tokenize(comps["tokenizer"], ["a red circle"] * 48).view(16, 3, -1).to(device)}
    empty = td.tokenize(comps["tokenizer"], [""])[0]
    ab = DDPMScheduler.from_config(comps["scheduler"].config).alphas_cumprod
    amp = torch.bfloat16 if device.type == "cuda" else None
    return td.UNetStep(unet, te, ema_u, ema_t, ab, lat, ids, empty, cfg, device, amp, graphs=graphs)


def _check_step_semantics(trainer) -> None:
    """One step: the EMA becomes decay * ema + (1 - decay) * new params; with lr 0 the params stay put."""
    trainer.set_schedule(1.0, 5)
    decay = min(trainer.cfg.ema_decay, 6 / 15)
    ema0 = [p.detach().clone() for p in trainer.ema_params]
    p0 = [p.detach().clone() for p in trainer.params]
    loss = trainer(128)
    assert torch.isfinite(loss) and loss.ndim == 0
    assert any(not torch.equal(a, b) for a, b in zip(p0, trainer.params)), "the step did not move the params"
    for e0, e1, p1 in zip(ema0, trainer.ema_params, trainer.params):
        torch.testing.assert_close(e1, decay * e0 + (1 - decay) * p1.detach(), rtol=1e-5, atol=1e-6)
    trainer.set_schedule(0.0, 6)
    p1 = [p.detach().clone() for p in trainer.params]
    trainer(128)
    for a, b in zip(p1, trainer.params):
        assert torch.equal(a, b), "lr 0 must leave the params unchanged (the step reads the new lr)"


def test_unet_step_ema_and_lr_on_cpu():
    torch.manual_seed(0)
    trainer = _tiny_trainer(torch.device("cpu"), graphs=False)
    _check_step_semantics(trainer)


def test_resumed_optimizer_state_keeps_moments_and_this_runs_flags():
    torch.manual_seed(0)
    a = _tiny_trainer(torch.device("cpu"), graphs=False)
    a.set_schedule(1.0, 1)
    a(128)
    a(128)
    saved = copy.deepcopy(a.opt.state_dict())
    for g in saved["param_groups"]:  # as a CUDA run saves them: tensor learning rates, fused, capturable
        g["lr"], g["fused"], g["capturable"] = torch.tensor(g["lr"]), True, True
    b = _tiny_trainer(torch.device("cpu"), graphs=False)
    b.load_optimizer_state(saved)
    for g in b.opt.param_groups:
        assert isinstance(g["lr"], float) and g["fused"] is False and g["capturable"] is False
    ref = a.opt.state_dict()["state"]
    for i, st in b.opt.state_dict()["state"].items():
        assert torch.equal(st["exp_avg"], ref[i]["exp_avg"]) and float(st["step"]) == 2.0
    b.set_schedule(1.0, 3)
    assert torch.isfinite(b(128))


def test_set_overrides_are_checked():
    cfg = td.apply_overrides(td.TrainConfig(), ["t_focus_frac=0.5", "unet_time=340", "res_cycle=[128, 256]"])
    assert (cfg.t_focus_frac, cfg.unet_time, cfg.res_cycle) == (0.5, 340, (128, 256))
    with pytest.raises(ValueError, match="KEY one of"):
        td.apply_overrides(td.TrainConfig(), ["unet_tim=340"])
    with pytest.raises(ValueError, match="t_focus_frac must be in"):
        td.apply_overrides(td.TrainConfig(), ["t_focus_frac=1.5"])
    with pytest.raises(ValueError, match="must be JSON"):
        td.apply_overrides(td.TrainConfig(), ["res_cycle=128,256"])
    with pytest.raises(ValueError, match="res_cycle must be"):
        td.apply_overrides(td.TrainConfig(), ["res_cycle=[96]"])


def test_timestep_focus_share():
    torch.manual_seed(0)
    trainer = _tiny_trainer(torch.device("cpu"), graphs=False)
    assert trainer.cfg.t_focus_frac == 0.35  # the default (the shipped recipe)
    t = trainer.sample_timesteps(20_000)
    assert t.min() >= 0 and t.max() == 999
    assert abs(float((t >= 600).float().mean()) - 0.65 * 0.4) < 0.02  # only the unfocused 65% reach t >= 600
    trainer.cfg = dataclasses.replace(trainer.cfg, t_focus_frac=0.0)
    t = trainer.sample_timesteps(20_000)
    assert abs(float((t >= 600).float().mean()) - 0.4) < 0.02  # uniform
    trainer.cfg = dataclasses.replace(trainer.cfg, t_focus_frac=0.7, t_focus_max=600)
    t = trainer.sample_timesteps(20_000)
    assert abs(float((t >= 600).float().mean()) - 0.3 * 0.4) < 0.02  # only the unfocused 30% reach t >= 600
    trainer.cfg = dataclasses.replace(trainer.cfg, t_focus_frac=1.0)
    assert int(trainer.sample_timesteps(5_000).max()) < 600


def test_tokenize_word_cache_equals_the_tokenizer():
    from visattn.data.shapes import sample_for_split
    from visattn.pipelines.tokenizer import build_tokenizer

    tok = build_tokenizer()
    caps = sum(td.caption_variants([sample_for_split(i, "train", 3) for i in range(300)], 3), [])
    caps += ["", "a", "Hello World!", "a red  circle", "émoji 🙂 star", " ".join(["red"] * 100), "zzqx circle"]
    ref = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(td.tokenize(tok, caps), ref)


@pytest.mark.gpu
def test_unet_step_cuda_graph_replay_trains_and_reads_the_schedule():
    torch.manual_seed(0)
    trainer = _tiny_trainer(torch.device("cuda"), graphs=True)
    trainer.set_schedule(1.0, 1)
    for _ in range(3):  # two eager warm-ups, then the capture + first replay
        trainer(128)
    assert 128 in trainer._graphs
    _check_step_semantics(trainer)  # both steps are graph replays
    losses = [float(trainer(128)) for _ in range(3)]
    assert len(set(losses)) == 3, "replays must draw new noise / timesteps each time"


@pytest.mark.gpu
def test_resume_from_a_run_without_graphs_captures_on_cuda():
    torch.manual_seed(0)
    eager = _tiny_trainer(torch.device("cuda"), graphs=False)
    eager.set_schedule(1.0, 1)
    eager(128)
    graphed = _tiny_trainer(torch.device("cuda"), graphs=True)
    graphed.load_optimizer_state(eager.opt.state_dict())
    assert all(g["capturable"] and torch.is_tensor(g["lr"]) for g in graphed.opt.param_groups)
    graphed.set_schedule(1.0, 2)
    for _ in range(4):  # warm-ups, capture, replays
        loss = graphed(128)
    assert 128 in graphed._graphs and torch.isfinite(loss)


def test_config_defaults_are_the_shipped_recipe():
    """`python -m visattn.pipelines.train_default` with no --set reproduces the shipped checkpoint's recipe: the
    defaults equal the config saved next to the shipped weights (seed included)."""
    from visattn.pipelines.default_model import DEFAULT_MODEL_DIR

    saved = json.loads((Path(DEFAULT_MODEL_DIR) / "train_config.json").read_text())
    defaults = json.loads(json.dumps(dataclasses.asdict(td.TrainConfig())))  # tuples -> lists, as saved
    assert saved["config"] == defaults
    assert saved["seed"] == defaults["seed"] == 0
