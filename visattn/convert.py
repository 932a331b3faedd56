"""Model conversion: swap a timm ViT's attention for :class:`visattn.nn.AgentAttention` and back.

    model = timm.create_model("vit_tiny_patch16_224", pretrained=True)
    visattn.convert.to_agent(model, num_agents=49)       # in place; then fine-tune (see docs/methods/agent.md)
    visattn.convert.from_agent(model)                     # back to timm Attention (agent parameters dropped)

The projections (``qkv``, ``proj``) are copied, so their state-dict keys are unchanged. The new parameters start
so that the converted model is close to the original: with ``init="zero"`` every bias and the depthwise conv are
zero; with ``init="local"`` (default) the query->agent biases also favour the agent pooled from the query's own
grid cell (``local_strength``), so each query reads mostly the attention result of its neighbourhood's agent.
Agent attention is *not* a training-free swap for a ViT: expect an accuracy drop before fine-tuning.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .nn.agent import AgentAttention

__all__ = ["to_agent", "from_agent", "agent_modules"]

_INITS = ("local", "zero", "official")


def _timm_attention_cls():
    try:
        from timm.layers import Attention
    except ImportError as e:  # pragma: no cover
        raise ImportError("visattn.convert needs timm (pip install timm)") from e
    return Attention


def _blocks(model: nn.Module) -> List[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks; to_agent supports timm VisionTransformer-style "
                         "models (model.blocks[i].attn, model.patch_embed.grid_size)")
    return list(blocks)


def _grid(model: nn.Module) -> Tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    gs = getattr(pe, "grid_size", None)
    if gs is None:
        raise ValueError("to_agent needs model.patch_embed.grid_size (a timm ViT)")
    return int(gs[0]), int(gs[1])


@torch.no_grad()
def _init_local(m: AgentAttention, strength: float) -> None:
    """Query->agent bias ``strength`` per matching axis for the agent whose pooled cell holds the query."""
    (wh, ww), (ph, pw) = m.window, m.pool_size
    # adaptive pooling cell of row y: floor(y*ph/wh) .. as in F.adaptive_avg_pool2d, use the cell centre test
    def cell(i: int, size: int, cells: int) -> int:
        return min(cells - 1, (i * cells) // size)

    rows = torch.tensor([cell(y, wh, ph) for y in range(wh)])
    cols = torch.tensor([cell(x, ww, pw) for x in range(ww)])
    agent_row = torch.arange(m.agent_num) // pw
    agent_col = torch.arange(m.agent_num) % pw
    ha = (rows[:, None] == agent_row[None, :]).to(m.ha_bias.dtype) * strength     # (wh, n)
    wa = (cols[:, None] == agent_col[None, :]).to(m.wa_bias.dtype) * strength     # (ww, n)
    m.ha_bias.copy_(ha.view(1, 1, wh, 1, -1).expand_as(m.ha_bias))
    m.wa_bias.copy_(wa.view(1, 1, 1, ww, -1).expand_as(m.wa_bias))


def to_agent(model: nn.Module, num_agents: int = 49, *, blocks: Optional[Iterable[int]] = None,
             init: str = "local", local_strength: float = 2.0) -> nn.Module:
    """Replace ``model.blocks[i].attn`` (timm ``Attention``) by :class:`AgentAttention`, in place; returns model.

    Args:
        num_agents: agents per layer (perfect square; official Agent-DeiT: 49).
        blocks: indices of the blocks to convert (default all; Agent-DeiT-B converts the first 4).
        init: ``"local"`` (zero biases/DWC + locality prior, default), ``"zero"`` (all new parameters zero) or
            ``"official"`` (random init of the official modules, for training from scratch).
        local_strength: logit bonus per matching axis for ``init="local"``.
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if not isinstance(num_agents, int) or num_agents < 1 or math.isqrt(num_agents) ** 2 != num_agents:
        raise ValueError(f"num_agents must be a positive perfect square, got {num_agents!r}")
    attn_cls = _timm_attention_cls()
    all_blocks = _blocks(model)
    idx = list(range(len(all_blocks))) if blocks is None else list(blocks)
    bad = [i for i in idx if not (isinstance(i, int) and -len(all_blocks) <= i < len(all_blocks))]
    if bad:
        raise ValueError(f"blocks must be indices in [0, {len(all_blocks)}), got {bad}")
    grid = _grid(model)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    for i in idx:
        blk = all_blocks[i]
        old = getattr(blk, "attn", None)
        if isinstance(old, AgentAttention):
            continue
        if type(old) is not attn_cls:
            raise ValueError(f"block {i}: attention is {type(old).__name__}; to_agent converts timm Attention only")
        unsupported = [n for n in ("q_norm", "k_norm", "norm") if not isinstance(getattr(old, n), nn.Identity)]
        if getattr(old, "gate", None) is not None:
            unsupported.append("gate")
        if old.qkv.out_features != 3 * old.qkv.in_features:
            unsupported.append("attn_dim != dim")
        if unsupported:
            raise ValueError(f"block {i}: timm Attention with {unsupported} cannot be converted (allowed: plain "
                             "qkv + proj attention)")
        w = old.qkv.weight
        new = AgentAttention(old.qkv.in_features, old.num_heads, qkv_bias=old.qkv.bias is not None,
                             attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p, agent_num=num_agents,
                             window=grid, num_prefix_tokens=prefix, proj_bias=old.proj.bias is not None,
                             device=w.device, dtype=w.dtype)
        new.qkv.load_state_dict(old.qkv.state_dict())
        new.proj.load_state_dict(old.proj.state_dict())
        new.scale = old.scale
        if init != "official":
            new.zero_agent_parameters()
            if init == "local":
                _init_local(new, local_strength)
        new.train(old.training)
        blk.attn = new
    return model


def from_agent(model: nn.Module) -> nn.Module:
    """Swap every :class:`AgentAttention` in ``model.blocks`` back to timm ``Attention`` (qkv/proj kept), in place."""
    attn_cls = _timm_attention_cls()
    for blk in _blocks(model):
        m = getattr(blk, "attn", None)
        if not isinstance(m, AgentAttention):
            continue
        if not m.fused_qkv:
            raise ValueError("from_agent needs the fused-qkv (DeiT/timm) layout")
        w = m.qkv.weight
        old = attn_cls(m.dim, num_heads=m.num_heads, qkv_bias=m.qkv.bias is not None,
                       proj_bias=m.proj.bias is not None, attn_drop=m.attn_drop.p, proj_drop=m.proj_drop.p)
        old.to(device=w.device, dtype=w.dtype)
        old.qkv.load_state_dict(m.qkv.state_dict())
        old.proj.load_state_dict(m.proj.state_dict())
        old.train(m.training)
        blk.attn = old
    return model


def agent_modules(model: nn.Module) -> List[Tuple[str, AgentAttention]]:
    """``(name, module)`` of every AgentAttention in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AgentAttention)]
