"""timm adapter: instance-level ``forward`` on ``timm.layers.Attention`` (ViT family), EVA's ``EvaAttention`` and
timm's ``AttentionRope`` (rotary embeddings, applied before the method sees q/k) and Swin ``WindowAttention``.

Geometry: a forward pre-hook on the model's ``patch_embed`` (the model itself if it has none) reads the input
image size and maps it through ``patch_embed.dynamic_feat_size`` (``grid_size`` for other patch embedders),
so ``forward_features`` and ``forward_intermediates`` see it too; ViT sequences are
``[num_prefix_tokens (cls/registers)][grid, row-major]``. Swin attention runs per window: its grid is the
module's ``window_size`` and the relative-position bias (+ shift mask) is passed as ``attn_mask``.
``remove`` deletes the instance ``forward`` (the class method shows through again) and the hook.
"""
from __future__ import annotations

import math
import types
from typing import Any, List, Optional

import torch
from timm.layers import Attention, apply_rot_embed_cat

from ..methods.base import AttentionMethod
from .base import Installed, LayerCtx, RunState, select

__all__ = ["matches", "resolve", "plan", "install", "supported_classes"]


def supported_classes() -> dict:
    """Attention class -> our forward."""
    table = {Attention: _vit_forward}
    try:
        from timm.models.swin_transformer import WindowAttention
        table[WindowAttention] = _swin_forward
    except ImportError:  # pragma: no cover
        pass
    try:
        from timm.models.eva import EvaAttention
        table[EvaAttention] = _rope_forward
    except ImportError:  # pragma: no cover
        pass
    try:
        from timm.layers.attention import AttentionRope
        table[AttentionRope] = _rope_forward
    except ImportError:  # pragma: no cover - older timm
        pass
    return table


def matches(target: Any) -> bool:
    return isinstance(target, torch.nn.Module)


def resolve(target: Any) -> List[torch.nn.Module]:
    return [target]


def _is_attention_like(mod: torch.nn.Module) -> bool:
    """An attention module we do not support (so that selecting it errors instead of being skipped)."""
    if "Attention" not in type(mod).__name__:
        return False
    return hasattr(mod, "qkv") or any(True for _ in mod.parameters(recurse=False))


def plan(model: torch.nn.Module, layers) -> list:
    table = supported_classes()
    candidates, unsupported = [], []
    for name, mod in model.named_modules():
        fwd = table.get(type(mod))
        if fwd is not None:
            candidates.append((name, "self", (mod, fwd)))
        elif _is_attention_like(mod):  # latent-query pooling attends to the tokens: counted as "cross"
            unsupported.append((name, "cross" if "Pool" in type(mod).__name__ else "self", type(mod).__name__))
    desc = ", ".join(f"{c.__module__}.{c.__name__}" for c in table)
    if not candidates and not unsupported:
        raise TypeError(f"{type(model).__name__} has no timm attention modules visattn supports ({desc})")
    return select(candidates, layers, model, unsupported, desc)


def _vit_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    return _attend_and_project(self, x, q, k, v, attn_mask, is_causal)


def _attend_and_project(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
    """The shared tail of the ViT-family forwards: the method on the patch grid (prefix tokens global), then the
    module's norm, optional gate (newer timm), output projection and dropout."""
    ctx: LayerCtx = self._visattn_ctx
    B, N, _ = x.shape
    gate_mod = getattr(self, "gate", None)
    gate = gate_mod(x).sigmoid() if gate_mod is not None else None
    if is_causal:
        causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask.masked_fill(~causal, float("-inf"))
    st = ctx.state
    grid = st.grid if st.grid is not None and st.spatial_start + math.prod(st.grid) == N else None
    out = ctx.attend(q, k, v, ctx.geometry(q, k, grid=grid, spatial_start=st.spatial_start), attn_mask=attn_mask)
    out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def _rope_qkv(self, x: torch.Tensor, rope: Optional[torch.Tensor]):
    """q, k, v (B, H, N, D) of EVA's ``EvaAttention`` / timm's ``AttentionRope``: fused or separate projections,
    EVA's q/v-only bias, q/k norms, rotary embedding on the grid tokens (prefix tokens unrotated), GQA heads
    expanded the way timm does it."""
    B, N, _ = x.shape
    kv_heads = getattr(self, "num_kv_heads", self.num_heads)
    if self.qkv is not None:
        q_bias = getattr(self, "q_bias", None)
        if q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((q_bias, self.k_bias, self.v_bias))
            if getattr(self, "qkv_bias_separate", False):
                qkv = self.qkv(x) + qkv_bias
            else:
                qkv = torch.nn.functional.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    groups = self.num_heads // kv_heads
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


def _rope_forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                  attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """``EvaAttention`` / ``AttentionRope`` forward with the attention itself swapped for the method."""
    q, k, v = _rope_qkv(self, x, rope)
    return _attend_and_project(self, x, q, k, v, attn_mask, is_causal)


def _swin_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
    ctx: LayerCtx = self._visattn_ctx
    B_, N, C = x.shape
    qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn_mask = self._get_rel_pos_bias()
    if mask is not None:
        num_win = mask.shape[0]
        mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
        attn_mask = attn_mask + mask.reshape(-1, self.num_heads, N, N)
    grid = tuple(self.window_size)
    grid = grid if math.prod(grid) == N else None
    x = ctx.attend(q, k, v, ctx.geometry(q, k, grid=grid), attn_mask=attn_mask)
    x = x.transpose(1, 2).reshape(B_, N, -1)
    x = self.proj(x)
    return self.proj_drop(x)


def _capture_hook(model: torch.nn.Module, state: RunState):
    pe = getattr(model, "patch_embed", None)

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        state.grid, state.spatial_start = None, int(getattr(model, "num_prefix_tokens", 0) or 0)
        if pe is not None and isinstance(x, torch.Tensor) and x.ndim == 4:
            hw = tuple(x.shape[-2:])
            if hasattr(pe, "dynamic_feat_size"):  # equals grid_size at the built size; handles dynamic sizes
                state.grid = tuple(int(v) for v in pe.dynamic_feat_size(hw))
            elif getattr(pe, "grid_size", None) is not None:
                state.grid = tuple(pe.grid_size)
        return None

    return hook


def install(target: Any, model: torch.nn.Module, chosen: list, method: AttentionMethod, state: RunState) -> Installed:
    inst = Installed()
    try:
        for name, kind, (mod, fwd) in chosen:
            mod._visattn_ctx = ctx = LayerCtx(name, kind, method, state)
            mod.forward = types.MethodType(fwd, mod)
            inst.layers.append(name)
            inst.contexts.append(ctx)

            def undo(mod=mod) -> None:
                mod.__dict__.pop("forward", None)
                mod.__dict__.pop("_visattn_ctx", None)

            inst.undo.append(undo)
        # on the patch embedder when there is one, so forward_features / forward_intermediates see the grid too
        hooked = getattr(model, "patch_embed", None)
        hooked = hooked if isinstance(hooked, torch.nn.Module) else model
        h = hooked.register_forward_pre_hook(_capture_hook(model, state), with_kwargs=True)
        inst.undo.append(h.remove)
    except BaseException:
        inst.remove()
        raise
    return inst
