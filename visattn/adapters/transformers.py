"""transformers adapter: an ``AttentionInterface`` function for the decoder self-attention of a (VL)M.

``install`` registers ``visattn_<orig>`` in ``AttentionInterface`` (our function) and in
``AttentionMaskInterface`` (the original implementation's mask function, so masks are unchanged) and
switches the decoder config's ``_attn_implementation`` to it; ``remove`` switches it back. Our function
runs the method only on selected layers and only for prefill (``q_len > 1``); everything else is
delegated to the original implementation. The vision tower is left untouched.

Geometry: a forward pre-hook on the model reads ``input_ids`` and ``image_grid_thw``/``video_grid_thw``
(Qwen2-VL / Qwen2.5-VL layout: each image/video is a contiguous run of ``t*h*w/merge**2`` placeholder
tokens ordered (t, h', w') row-major). ``geometry.spans`` lists all of them, ``grid``/``spatial_start``
the first. Without those inputs (or when batch rows differ) the geometry has no grid.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from transformers import AttentionInterface, PreTrainedModel

try:
    from transformers import AttentionMaskInterface
except ImportError:  # pragma: no cover
    from transformers.masking_utils import AttentionMaskInterface

from ..methods.base import AttentionMethod
from .base import Installed, LayerCtx, RunState, select

__all__ = ["matches", "resolve", "plan", "install", "vision_spans", "SUPPORTED_IMPLEMENTATIONS"]

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


def matches(target: Any) -> bool:
    return isinstance(target, PreTrainedModel)


def resolve(target: Any) -> List[torch.nn.Module]:
    return [target]


def _decoder_attention(mod: torch.nn.Module) -> bool:
    return getattr(mod, "is_causal", False) is True and hasattr(mod, "layer_idx") and hasattr(mod, "config")


def plan(model: torch.nn.Module, layers) -> list:
    candidates = [(n, "self", m) for n, m in model.named_modules() if _decoder_attention(m)]
    if not candidates:
        raise TypeError(f"{type(model).__name__} has no decoder self-attention modules (causal, with layer_idx) "
                        f"visattn can drive; supported: transformers decoders/VLMs using AttentionInterface")
    chosen = select(candidates, layers, model)
    for cfg in {id(m.config): m.config for _, _, m in chosen}.values():
        impl = cfg._attn_implementation
        impl = impl[len("visattn_"):] if isinstance(impl, str) and impl.startswith("visattn_") else impl
        if impl not in SUPPORTED_IMPLEMENTATIONS:
            raise ValueError(f"{type(model).__name__} uses attn_implementation={impl!r}; visattn drives "
                             f"{SUPPORTED_IMPLEMENTATIONS} (load the model with attn_implementation='sdpa')")
    return chosen


def _model_eager(module: torch.nn.Module):
    """The model file's own ``eager_attention_forward`` (softcap, sinks, dropout as the model defines them)."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _original_fn(name: str):
    if name == "eager":
        # eager lives in each model file (looked up per module at call time, see _visattn_attention); this generic
        # one is only used for a module whose file defines none, and handles GQA via module.num_key_value_groups
        from transformers.integrations.sdpa_attention import repeat_kv

        def eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            key = repeat_kv(key, getattr(module, "num_key_value_groups", 1))
            value = repeat_kv(value, getattr(module, "num_key_value_groups", 1))
            w = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
            if attention_mask is not None:
                w = w + attention_mask
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
            return torch.matmul(w, value).transpose(1, 2).contiguous(), w
        return eager
    return AttentionInterface._global_mapping[name]


def _visattn_attention(orig: str):
    fallback = _original_fn(orig)

    def attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
        ctx: Optional[LayerCtx] = getattr(module, "_visattn_ctx", None)
        q_len, kv_len = query.shape[2], key.shape[2]
        if ctx is None or q_len <= 1:
            fn = (_model_eager(module) or fallback) if orig == "eager" else fallback
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        mask = attention_mask
        if mask is None and kwargs.get("is_causal", getattr(module, "is_causal", True)):
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
        elif mask is not None and mask.shape[-1] != kv_len:
            mask = mask[..., :kv_len]
        st = ctx.state
        spans = st.spans if q_len == kv_len == st.seq_len else ()
        grid, start = (spans[0][1], spans[0][0]) if spans else (None, 0)
        geo = ctx.geometry(query, key, grid=grid, spatial_start=start, spans=spans)
        out = ctx.attend(query, key, value, geo, scale=scaling, attn_mask=mask)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _register(orig: str) -> str:
    name = f"visattn_{orig}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _visattn_attention(orig))
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[orig])
    return name


def vision_spans(ids: torch.Tensor, image_id: Optional[int], video_id: Optional[int], image_thw, video_thw,
                 merge: int) -> Tuple[Tuple[int, Tuple[int, ...]], ...]:
    """(start, grid) of every image/video in one row of ``input_ids``; () if they do not match the grids."""
    ids = ids.tolist()
    rows = {image_id: [tuple(int(x) for x in r) for r in (image_thw if image_thw is not None else [])],
            video_id: [tuple(int(x) for x in r) for r in (video_thw if video_thw is not None else [])]}
    used = {image_id: 0, video_id: 0}
    spans, i = [], 0
    while i < len(ids):
        tok = ids[i]
        if tok not in rows or tok is None:
            i += 1
            continue
        if used[tok] >= len(rows[tok]):
            return ()
        t, h, w = rows[tok][used[tok]]
        used[tok] += 1
        n = t * h * w // (merge * merge)
        if ids[i:i + n] != [tok] * n:
            return ()
        grid = (h // merge, w // merge) if t == 1 else (t, h // merge, w // merge)
        spans.append((i, grid))
        i += n
    return tuple(spans)


def _capture_hook(model: torch.nn.Module, state: RunState):
    cfg = model.config
    vcfg = getattr(cfg, "vision_config", None)
    merge = int(getattr(vcfg, "spatial_merge_size", 1) or 1)
    image_id, video_id = getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state.spans, state.seq_len = (), None
        if isinstance(ids, torch.Tensor) and ids.ndim == 2:
            state.seq_len = ids.shape[1]
            rows = {vision_spans(r, image_id, video_id, kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw"),
                                 merge) for r in ids}
            state.spans = rows.pop() if len(rows) == 1 else ()
        return None

    return hook


def install(target: Any, model: torch.nn.Module, chosen: list, method: AttentionMethod, state: RunState) -> Installed:
    inst = Installed()
    try:
        for name, kind, mod in chosen:
            mod._visattn_ctx = ctx = LayerCtx(name, kind, method, state)
            inst.layers.append(name)
            inst.contexts.append(ctx)
            inst.undo.append(lambda mod=mod: mod.__dict__.pop("_visattn_ctx", None))
        for cfg in {id(m.config): m.config for _, _, m in chosen}.values():
            before = cfg._attn_implementation
            orig = before[len("visattn_"):] if before.startswith("visattn_") else before
            cfg._attn_implementation = _register(orig)
            inst.undo.append(lambda cfg=cfg, orig=orig: setattr(cfg, "_attn_implementation", orig))
        h = model.register_forward_pre_hook(_capture_hook(model, state), with_kwargs=True)
        inst.undo.append(h.remove)
    except BaseException:
        inst.remove()
        raise
    return inst
