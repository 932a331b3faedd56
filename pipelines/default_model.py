"""The embedded default text-to-image model: a small Stable-Diffusion-architecture pipeline trained on
:mod:`visattn.data.shapes`, shipped as package data (``visattn/pipelines/weights/shapes_sd``).

    from visattn.pipelines import load_default
    pipe = load_default()                               # offline, CPU float32 by default
    img = pipe("a red circle on a blue background", num_inference_steps=20).images[0]

Architecture (diffusers classes, standard configs): ``UNet2DConditionModel`` with self- and cross-attention
at three latent resolutions (plus the mid block), an ``AutoencoderKL`` with 4x downsampling (128 px -> 32x32x4
latents), a small ``CLIPTextModel``, a byte-level BPE ``CLIPTokenizer`` and a ``DDIMScheduler``
(v-prediction). ``visattn.pipelines.train_default`` reproduces the weights.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "shapes_sd"
CLASSIFIER_PATH = WEIGHTS_DIR / "shapes_classifier.safetensors"

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 4),  # diffusers' quirk: this is the number of heads -> head dim 32 everywhere
    cross_attention_dim=256, norm_num_groups=32, transformer_layers_per_block=1,
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    sample_size=128,
)
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=256,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="trailing",
)


def build_components(seed: int = 0, unet: dict | None = None, vae: dict | None = None,
                     text: dict | None = None) -> dict[str, Any]:
    """Randomly initialised components (configs overridable), for training from scratch."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    tcfg = {**TEXT_CONFIG, **(text or {})}
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **tcfg))
    ucfg = {**UNET_CONFIG, **(unet or {})}
    ucfg["cross_attention_dim"] = tcfg["hidden_size"]
    return dict(unet=UNet2DConditionModel(**ucfg), vae=AutoencoderKL(**{**VAE_CONFIG, **(vae or {})}),
                text_encoder=text_encoder, tokenizer=tok, scheduler=DDIMScheduler(**SCHEDULER_CONFIG))


def make_pipeline(components: dict[str, Any]):
    """A ``StableDiffusionPipeline`` from components (no safety checker / feature extractor)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)


def load_default(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, path: str | os.PathLike | None = None):
    """Load the shipped default model offline (float32 on CPU, float16 on CUDA unless `dtype` is given)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no default model at {path}; train it with `python -m visattn.pipelines.train_default`")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():  # newer diffusers prefer `dtype=`; older ones only know `torch_dtype=`
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def count_parameters(pipe) -> dict[str, int]:
    """Parameter counts of the trainable components."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
