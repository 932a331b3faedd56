"""visattn processors for diffusers attention modules.

Each mirrors one stock processor's pre/post-processing (projections, norms, rotary embeddings, joint
concatenation order, residual/rescale, 4-D inputs) and replaces only the kernel call by
``method(q, k, v, geometry)`` with q/k/v as (B, H, N, D).

| stock processor            | ours              | token order in the attention call  |
|----------------------------|-------------------|------------------------------------|
| AttnProcessor2_0/AttnProcessor | UNetProcessor | image grid (a UNet level) only     |
| JointAttnProcessor2_0 (SD3) | JointProcessor   | [image grid][text]                 |
| FluxAttnProcessor          | FluxProcessor     | [text][image grid]                 |
| CogVideoXAttnProcessor2_0  | CogVideoXProcessor | [text][video grid]                |
| WanAttnProcessor           | WanProcessor      | video grid (self) / text keys (cross) |
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..geometry import TokenGeometry
from .base import LayerCtx

__all__ = ["VisProcessor", "UNetProcessor", "JointProcessor", "FluxProcessor", "CogVideoXProcessor", "WanProcessor"]


def _bhsd_mask(mask: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """A (B, S_k) key mask -> (B, 1, 1, S_k) as diffusers' native dispatch backend does."""
    if mask is not None and mask.ndim == 2:
        return mask.view(batch, 1, 1, -1)
    return mask


def _split_heads(attn, query, key, value, batch_size: int):
    """(B, S, H*D) projections -> (B, H, S, D) with the module's q/k norms applied, as every stock processor does."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


class VisProcessor:
    """Base: holds the layer context and the stock processor it replaced (restored by ``remove``)."""

    _attention_backend = None  # kept so ModelMixin.set_attention_backend() keeps working
    _parallel_config = None

    def __init__(self, ctx: LayerCtx, original) -> None:
        self.ctx, self.original = ctx, original

    def _span(self, seq_len: int, n_img: int, text_first: bool) -> Tuple[Optional[Tuple[int, ...]], int]:
        """(grid, spatial_start) of the image/video tokens in a joint sequence, or (None, 0) if unknown."""
        grid = self.ctx.state.grid
        if grid is None or math.prod(grid) != n_img:
            return None, 0
        return grid, (seq_len - n_img if text_first else 0)

    def _run(self, q, k, v, geometry: TokenGeometry, mask=None, scale=None) -> torch.Tensor:
        return self.ctx.attend(q, k, v, geometry, scale=scale, attn_mask=mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ctx.name!r}, {type(self.ctx.method).__name__})"


class UNetProcessor(VisProcessor):
    """For legacy ``Attention`` with ``AttnProcessor2_0`` (SD1.5/SDXL UNets, VAE, PixArt-style blocks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        n_query = hidden_states.shape[1]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value, head_dim = _split_heads(attn, query, key, value, batch_size)

        base = None
        if input_ndim == 4:
            grid = (height, width)
        else:  # a UNet level (or patched tokens): the denoiser's token grid downsampled by powers of two
            base = self.ctx.state.grid if self.ctx.state.grid is not None and len(self.ctx.state.grid) == 2 else None
            try:
                grid = TokenGeometry.grid_for_level(base, n_query) if base is not None else None
            except ValueError:  # no level matches: leave the layout unknown rather than guess
                grid = base = None
        geo = self.ctx.geometry(query, key, grid=grid, base_grid=base)
        hidden_states = self._run(query, key, value, geo, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointProcessor(VisProcessor):
    """For ``JointAttnProcessor2_0`` (SD3/SD3.5): joint sequence is [image][text]."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value, head_dim = _split_heads(attn, query, key, value, batch_size)
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], dim=2), torch.cat([key, ek], dim=2), torch.cat([value, ev], dim=2)

        grid, start = self._span(query.shape[2], residual.shape[1], text_first=False)
        hidden_states = self._run(query, key, value, self.ctx.geometry(query, key, grid=grid, spatial_start=start))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxProcessor(VisProcessor):
    """For ``FluxAttnProcessor``: joint sequence is [text][image]; single blocks get it pre-concatenated."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1), torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        grid = self.ctx.state.grid
        n_img = math.prod(grid) if grid is not None else -1
        grid, start = self._span(q.shape[2], n_img, text_first=True)
        out = self._run(q, k, v, self.ctx.geometry(q, k, grid=grid, spatial_start=start),
                        _bhsd_mask(attention_mask, q.shape[0]))
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class CogVideoXProcessor(VisProcessor):
    """For ``CogVideoXAttnProcessor2_0``: joint sequence is [text][video]; rotary on the video part only."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        text_seq_length = encoder_hidden_states.size(1)
        n_video = hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value, head_dim = _split_heads(attn, query, key, value, batch_size)
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        grid, start = self._span(sequence_length, n_video, text_first=True)
        hidden_states = self._run(query, key, value, self.ctx.geometry(query, key, grid=grid, spatial_start=start),
                                  attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on (B, S, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanProcessor(VisProcessor):
    """For ``WanAttnProcessor``: attn1 over video tokens (rotary), attn2 to text (+ I2V image context)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - 512  # as diffusers: text context is 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)

        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        hidden_states_img = None
        if encoder_hidden_states_img is not None:  # I2V image-context branch: exact dense attention
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            ki, vi = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (key_img, value_img))
            hidden_states_img = F.scaled_dot_product_attention(q, ki, vi).transpose(1, 2).flatten(2, 3).type_as(query)

        grid, start = self._span(q.shape[2], q.shape[2], text_first=False)
        out = self._run(q, k, v, self.ctx.geometry(q, k, grid=grid, spatial_start=start),
                        _bhsd_mask(attention_mask, q.shape[0]))
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
