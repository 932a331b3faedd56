"""Independent references for bi-level routing attention tests (plain loops + fp64 masked attention)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from visattn.kernels import masked_attention


def spec_reference(q, k, v, hw, S, topk, *, scale=None, mask_padding=False, prefix=0, routing=None,
                   return_routing=False):
    """BRA from the spec, token by token: q/k/v (B, H, N, D) with ``prefix`` extra tokens before the grid and
    any remaining tokens after it (extras are global). Legacy padding: zero tokens, unmasked unless
    ``mask_padding``. Ties in the routing go to the lower region index."""
    B, Hh, N, D = q.shape
    if k.shape[1] != Hh:
        k, v = (t.repeat_interleave(Hh // k.shape[1], 1) for t in (k, v))
    H, W = hw
    rh, rw = math.ceil(H / S), math.ceil(W / S)
    Hp, Wp = S * rh, S * rw
    P = Hp * Wp - H * W
    scale = D ** -0.5 if scale is None else scale
    R = S * S
    region = [-1] * (N + P)  # working index -> region (-1: extra token)
    pad = [False] * N + [True] * P
    members = [[] for _ in range(R)]
    nxt = N
    for y in range(Hp):
        for x in range(Wp):
            if y < H and x < W:
                w_idx = prefix + y * W + x
            else:
                w_idx, nxt = nxt, nxt + 1
            a = (y // rh) * S + (x // rw)
            region[w_idx] = a
            members[a].append(w_idx)
    z = lambda t: torch.cat([t, t.new_zeros(B, Hh, P, D)], 2)  # noqa: E731
    qw, kw, vw = z(q.double()), z(k.double()), z(v.double())
    if routing is None:
        def means(t):
            out = torch.zeros(B, R, Hh * D, dtype=torch.float64)
            for a in range(R):
                idx = [i for i in members[a] if not (mask_padding and pad[i])]
                out[:, a] = t[:, :, idx].sum(2).reshape(B, Hh * D) / len(idx)
            return out
        aff = (means(qw) * scale) @ means(kw).transpose(1, 2)
        routing = torch.tensor([[sorted(range(R), key=lambda c: (-float(aff[b, a, c]), c))[:topk]
                                 for a in range(R)] for b in range(B)], dtype=torch.long)
    routing = routing.expand(B, -1, -1)
    allow = torch.zeros(B, R, R, dtype=torch.bool)  # allow[b, a, c]: query region a routed to key region c
    for b in range(B):
        for a in range(R):
            for c in routing[b, a].tolist():
                allow[b, a, c] = True
    reg = torch.tensor(region)
    extra = reg < 0
    ri, rj = reg.clamp_min(0).view(-1, 1), reg.clamp_min(0).view(1, -1)
    mask = allow[:, ri, rj] | extra.view(1, -1, 1) | extra.view(1, 1, -1)
    if mask_padding:
        mask = mask & ~torch.tensor(pad).view(1, 1, -1)
    mask = mask.unsqueeze(1)
    out = masked_attention(qw, kw, vw, mask, scale=scale)[:, :, :N]
    return (out, routing) if return_routing else out


def legacy_module_forward(x: torch.Tensor, sd: dict, *, n_win: int, num_heads: int, qk_dim: int, topk: int,
                          qk_scale: Optional[float] = None, auto_pad: bool = False, side_dwconv: int = 3):
    """The released legacy module's forward, re-written with plain torch ops from its state dict
    (``qkv.qkv.*``, ``wo.*``, ``lepe.*``): NHWC in, NHWC out, gather-based."""
    n, h_in, w_in, c = x.shape
    S = n_win
    if auto_pad:
        x = F.pad(x, (0, 0, 0, (S - w_in % S) % S, 0, (S - h_in % S) % S))
    _, H, W, _ = x.shape
    h, w = H // S, W // S
    scale = qk_scale or qk_dim ** -0.5
    xw = x.reshape(n, S, h, S, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, S * S, h, w, c)  # windows
    qkv = F.linear(xw, sd["qkv.qkv.weight"], sd["qkv.qkv.bias"])
    q, kv = qkv.split([qk_dim, qk_dim + c], dim=-1)
    q_pix = q.reshape(n, S * S, h * w, qk_dim)
    kv_pix = kv.reshape(n, S * S, h * w, qk_dim + c)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk_dim].mean([2, 3])
    v_img = kv[..., qk_dim:].reshape(n, S, S, h, w, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, H, W)
    lepe = F.conv2d(v_img, sd["lepe.weight"], sd["lepe.bias"], padding=side_dwconv // 2, groups=c)
    lepe = lepe.permute(0, 2, 3, 1)
    logits = (q_win * scale) @ k_win.transpose(-2, -1)
    r_idx = torch.topk(logits, k=topk, dim=-1).indices  # (n, S^2, topk)
    sel = torch.gather(kv_pix.unsqueeze(1).expand(-1, S * S, -1, -1, -1), 2,
                       r_idx.view(n, S * S, topk, 1, 1).expand(-1, -1, -1, h * w, qk_dim + c))
    k_sel, v_sel = sel.split([qk_dim, c], dim=-1)
    m = num_heads
    k_sel = k_sel.reshape(n * S * S, topk, h * w, m, qk_dim // m).permute(0, 3, 4, 1, 2).reshape(
        n * S * S, m, qk_dim // m, topk * h * w)
    v_sel = v_sel.reshape(n * S * S, topk, h * w, m, c // m).permute(0, 3, 1, 2, 4).reshape(
        n * S * S, m, topk * h * w, c // m)
    qh = q_pix.reshape(n * S * S, h * w, m, qk_dim // m).transpose(1, 2)
    attn = torch.softmax((qh * scale) @ k_sel, dim=-1)
    out = attn @ v_sel  # (n*S^2, m, h*w, c/m)
    out = out.reshape(n, S, S, m, h, w, c // m).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, H, W, c)
    out = F.linear(out + lepe, sd["wo.weight"], sd["wo.bias"])
    return out[:, :h_in, :w_in]
