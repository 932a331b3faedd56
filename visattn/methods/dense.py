"""`Dense`: exact attention through visattn's own processor path (the identity method)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..geometry import TokenGeometry
from .base import AttentionMethod, register_method

__all__ = ["Dense"]


@register_method("dense")
@dataclass
class Dense(AttentionMethod):
    """Plain softmax attention (F.scaled_dot_product_attention). Outputs equal the untouched model's."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: TokenGeometry, *,
               scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def pattern(self, geometry: TokenGeometry, query_index: int) -> torch.Tensor:
        return torch.ones(geometry.kv_len, dtype=torch.bool)
