"""A faithful re-implementation of the released (legacy) gather-based BRA core, for tests and benchmarks.

It follows the released algorithm step by step: zero-pad the grid to a multiple of the region count,
cut it into ``S*S`` regions, route with ``torch.topk`` on region means, *gather* a top-k-fold copy of the
keys and values of the routed regions, and run dense attention inside each region. Memory grows with
``topk * region_size`` per query region, which is what the gather-free path avoids.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..kernels.reference import expand_kv_heads
from ._routing_core import check_routing, check_topk, make_region_grid, region_affinity

__all__ = ["bilevel_routing_attention_gather"]


def bilevel_routing_attention_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, spatial_shape,
                                     num_regions: int, topk: int, scale: Union[float, str, None] = None,
                                     routing: Optional[torch.Tensor] = None, return_routing: bool = False):
    """Gather-based BRA on (B, H, N, D) tensors (legacy padding: padded tokens are zeros, never masked).

    ``scale``: None -> head_dim**-0.5, "legacy" -> (H*D)**-0.5, or a float; used for routing and attention.
    ``routing``: optional (B|1, S*S, topk) region indices to use instead of computing them.
    """
    B, Hh, N, D = q.shape
    grid = make_region_grid(spatial_shape, num_regions)
    check_topk(topk, grid)
    if N != grid.height * grid.width or k.shape[2] != N:
        raise ValueError(f"q/k/v must have H*W={grid.height * grid.width} tokens, got {N} and {k.shape[2]}")
    k, v = expand_kv_heads(q, k, v)
    if scale is None:
        scale = D ** -0.5
    elif scale == "legacy":
        scale = (Hh * D) ** -0.5
    S, rh, rw = num_regions, grid.rh, grid.rw
    hp, wp = grid.padded_hw
    R, r = S * S, rh * rw

    if routing is None:  # released router: (q_r * scale) @ k_r^T, torch.topk, no gradient
        # the affinity of the gather-free path (region_affinity: fp32 sums, fp64 for fp64 inputs), so both
        # paths route identically; it equals the released (q_r * scale) @ k_r^T up to rounding
        with torch.no_grad():
            routing = torch.topk(region_affinity(q, k, grid, scale), k=topk, dim=-1).indices
    else:
        routing = check_routing(routing, B, grid)
        topk = routing.shape[-1]

    def to_regions(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, D) -> (B, H, R, r, D)
        x = x.reshape(B, Hh, grid.height, grid.width, D)
        x = torch.nn.functional.pad(x, (0, 0, 0, wp - grid.width, 0, hp - grid.height))
        return x.reshape(B, Hh, S, rh, S, rw, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, Hh, R, r, D)

    qp, kp, vp = to_regions(q), to_regions(k), to_regions(v)
    # gather: (B, H, R, topk, r, D), a materialised topk-fold copy of the routed regions' keys and values
    idx = routing.view(B, 1, R, topk, 1, 1).expand(B, Hh, R, topk, r, D)
    k_sel = torch.gather(kp.unsqueeze(2).expand(B, Hh, R, R, r, D), 3, idx).reshape(B, Hh, R, topk * r, D)
    v_sel = torch.gather(vp.unsqueeze(2).expand(B, Hh, R, R, r, D), 3, idx).reshape(B, Hh, R, topk * r, D)
    attn = torch.softmax((qp * scale) @ k_sel.transpose(-1, -2), dim=-1)  # (B, H, R, r, topk*r)
    out = attn @ v_sel  # (B, H, R, r, D)
    out = out.reshape(B, Hh, S, S, rh, rw, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, Hh, hp, wp, D)
    out = out[:, :, :grid.height, :grid.width].reshape(B, Hh, N, D)
    return (out, routing) if return_routing else out
