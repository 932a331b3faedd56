"""A tiny random-weight Stable Diffusion pipeline built offline (the demo's fallback model and test model).

It has a real CLIP tokenizer (byte-level vocabulary written here) and text encoder, so prompts work; its
pictures are structured noise, but every code path (attention methods, sizes, seeds, CFG) is the real one.
"""
from __future__ import annotations

import torch

__all__ = ["tiny_sd_pipeline"]


def tiny_sd_pipeline(seed: int = 0, device: str = "cpu"):
    """A ~1.5 M-parameter ``StableDiffusionPipeline`` with random weights (seeded), no network access."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from visattn.pipelines.tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    merges = ["a t</w>", "c a", "ca t</w>", "o g</w>", "d og</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(block_out_channels=[16, 32, 32], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                            norm_num_groups=8, sample_size=64, layers_per_block=1)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"], hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=77))
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe._visattn_tiny = True  # the demo picks 2 steps / 64 px defaults for it
    return pipe.to(device)
