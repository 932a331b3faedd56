"""Tiny offline models (random weights, seeded) shared by the tests. Nothing loads from a hub.

Each ``tiny_*`` builder returns an eval-mode fp32 model; ``*_inputs`` builders return matching call kwargs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from visattn.methods import Dense

__all__ = [
    "tiny_unet", "unet_inputs", "tiny_sdxl_unet", "sdxl_unet_inputs", "tiny_sd3", "sd3_inputs", "tiny_flux",
    "flux_inputs", "tiny_wan", "wan_inputs", "tiny_cogvideox", "cogvideox_inputs", "tiny_vit", "tiny_swin",
    "tiny_qwen2_vl", "qwen_inputs", "tiny_sd_pipeline", "pipeline_kwargs", "tiny_flux_pipeline",
    "flux_pipeline_kwargs", "GeometryRecorder",
]


@dataclass
class GeometryRecorder(Dense):
    """Dense attention that records every geometry it is given (and does not override ``reset``)."""

    log: List = field(default_factory=list, compare=False, repr=False)

    def attend(self, q, k, v, geometry, *, scale=None, attn_mask=None):
        self.log.append(geometry)
        return super().attend(q, k, v, geometry, scale=scale, attn_mask=attn_mask)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_unet(seed: int = 0):
    """SD1.5-style UNet: 2 levels, cross-attention to 32-d text, 8 heads of 4 at level 0."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()


def unet_inputs(hw: Tuple[int, int] = (8, 12), batch: int = 2, text_len: int = 7, seed: int = 1) -> Dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, *hw, generator=g), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g))


def tiny_sdxl_unet(seed: int = 0):
    """SDXL-style UNet: ``addition_embed_type="text_time"``, 2 transformer layers in the attention level."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
        use_linear_projection=True, norm_num_groups=32).eval()


def sdxl_unet_inputs(hw: Tuple[int, int] = (8, 12), batch: int = 2, seed: int = 1) -> Dict:
    d = unet_inputs(hw, batch, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    d["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 16, generator=g),
                              "time_ids": torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]).repeat(batch, 1)}
    return d


def tiny_sd3(seed: int = 0):
    """SD3-style MMDiT (joint attention, image tokens first)."""
    from diffusers import SD3Transformer2DModel

    _seeded(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def sd3_inputs(hw: Tuple[int, int] = (8, 12), batch: int = 2, text_len: int = 5, seed: int = 1) -> Dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, *hw, generator=g),
                encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.tensor([500.0] * batch))


def tiny_flux(seed: int = 0):
    """Flux-style transformer: 1 double-stream + 1 single-stream block (joint, text first)."""
    from diffusers import FluxTransformer2DModel

    _seeded(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def flux_inputs(grid: Tuple[int, int] = (3, 5), batch: int = 1, text_len: int = 5, seed: int = 1) -> Dict:
    """Packed latents for a (rows, cols) token grid with matching ``img_ids``."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(batch, h * w, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.tensor([0.5] * batch),
                img_ids=ids.reshape(h * w, 3), txt_ids=torch.zeros(text_len, 3))


def tiny_wan(seed: int = 0):
    """Wan-style video transformer (self-attention over (F, H, W) tokens with 3-D rotary; cross to text)."""
    from diffusers import WanTransformer3DModel

    _seeded(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=32).eval()


def wan_inputs(fhw: Tuple[int, int, int] = (3, 8, 12), batch: int = 1, text_len: int = 6, seed: int = 1) -> Dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, *fhw, generator=g), timestep=torch.tensor([500] * batch),
                encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g))


def tiny_cogvideox(seed: int = 0):
    """CogVideoX-style video transformer (joint [text][video] attention)."""
    from diffusers import CogVideoXTransformer3DModel

    _seeded(seed)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       num_layers=1, text_embed_dim=16, time_embed_dim=8, sample_width=12,
                                       sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=6).eval()


def cogvideox_inputs(fhw: Tuple[int, int, int] = (2, 8, 12), batch: int = 1, text_len: int = 6, seed: int = 1) -> Dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = fhw
    return dict(hidden_states=torch.randn(batch, f, 4, h, w, generator=g),
                encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g), timestep=torch.tensor([500] * batch))


def tiny_vit(img_size=(32, 48), seed: int = 0, **kw):
    """timm ``vit_tiny_patch16_224`` at a small (non-square by default) image size, 10 classes."""
    import timm

    _seeded(seed)
    kw.setdefault("depth", 2)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, num_classes=10, **kw).eval()


def tiny_swin(img_size: int = 64, seed: int = 0):
    """timm Swin (window attention with relative-position bias and shifted windows)."""
    import timm

    _seeded(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, window_size=4,
                             embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()


def tiny_qwen2_vl(version: str = "2.5", seed: int = 0, attn_implementation: str = "sdpa"):
    """Tiny Qwen2.5-VL (or Qwen2-VL with ``version="2"``) built from a config; image/video ids 100/101."""
    from transformers import AutoModelForImageTextToText

    _seeded(seed)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)
    if version == "2":
        from transformers import Qwen2VLConfig

        cfg = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4,
                                                                 patch_size=14, spatial_merge_size=2,
                                                                 temporal_patch_size=2), **ids)
    else:
        from transformers import Qwen2_5_VLConfig

        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]), **ids)
    return AutoModelForImageTextToText.from_config(cfg, attn_implementation=attn_implementation).eval()


def qwen_inputs(video_thw=(2, 4, 6), image_thw=None, seed: int = 1) -> Dict:
    """input_ids with a video span (and optionally an image span) plus matching pixel tensors and grid_thw."""
    g = torch.Generator().manual_seed(seed)
    ids = [5]
    out: Dict = {}
    if image_thw is not None:
        grid = torch.tensor([list(image_thw)])
        ids += [102] + [100] * int(grid.prod() // 4) + [103, 7]
        out.update(pixel_values=torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=g), image_grid_thw=grid)
    if video_thw is not None:
        grid = torch.tensor([list(video_thw)])
        ids += [102] + [101] * int(grid.prod() // 4) + [103]
        out.update(pixel_values_videos=torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=g),
                   video_grid_thw=grid)
    ids += [6, 7, 8]
    input_ids = torch.tensor([ids])
    out["input_ids"] = input_ids
    out["mm_token_type_ids"] = (input_ids == 100).int() + (input_ids == 101).int() * 2
    return out


def tiny_sd_pipeline(seed: int = 0):
    """StableDiffusionPipeline (tiny UNet + VAE, no text encoder/tokenizer): call with ``pipeline_kwargs()``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    unet = tiny_unet(seed)
    _seeded(seed + 1)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(batch: int = 1, steps: int = 2, height: int = 32, width: int = 48, seed: int = 0,
                    guidance_scale: float = 5.0) -> Dict:
    g = torch.Generator().manual_seed(1000 + seed)
    return dict(prompt_embeds=torch.randn(batch, 7, 32, generator=g),
                negative_prompt_embeds=torch.randn(batch, 7, 32, generator=g), num_inference_steps=steps,
                height=height, width=width, guidance_scale=guidance_scale, output_type="np",
                generator=torch.Generator().manual_seed(seed))


def tiny_flux_pipeline(seed: int = 0):
    """FluxPipeline (tiny transformer + VAE, no text encoders): call with ``flux_pipeline_kwargs()``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux(seed)
    _seeded(seed + 1)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline_kwargs(steps: int = 2, height: int = 24, width: int = 40, seed: int = 0) -> Dict:
    g = torch.Generator().manual_seed(2000 + seed)
    return dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                height=height, width=width, num_inference_steps=steps, max_sequence_length=5, output_type="np",
                generator=torch.Generator().manual_seed(seed))
