"""The default model's training script (issue 9): a tiny CPU run exports a loadable pipeline with its config,
and a rerun with the same folder resumes from the stage checkpoints instead of training again."""
from __future__ import annotations

import json

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
