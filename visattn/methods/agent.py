"""`Agent`: training-free AgentSD (agent attention + token merging) for diffusion UNets and image transformers.

Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024)
with the AgentSD recipe of the official repository (LeapLabTHU/Agent-Attention, ``agentsd/patch.py`` and
``agentsd/merge.py``; see docs/methods/agent.md). With a small set of agent tokens A (n << N)::

    V_A = softmax(A K^T * s) V                         # agents gather from all keys   (SDPA call 1)
    O   = softmax(Q A^T * s ** agent_scale) V_A        # queries read the agents        (SDPA call 2)
          + residual * V                               # AgentSD's shortcut term

with ``s`` the attention scale (head_dim ** -0.5 by default). The agents are merged queries: ToMe bipartite
matching of the grid tokens (as released) or plain average pooling of the queries (``merge="pool"``).
Before the attention, ToMe also merges the grid tokens themselves (``merge_ratio``) and copies the outputs
back afterwards, exactly as AgentSD does on ``attn1``. Everything per call (grid, step, layer) comes from the
:class:`TokenGeometry`.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..geometry import TokenGeometry
from ._tome import BipartiteGraph, bipartite_graph
from .base import AttentionMethod, register_method

__all__ = ["Agent", "agent_attention"]

_MERGES = ("tome", "pool")
_AFTER = ("tome", "dense")
_METRICS = ("keys", "queries")


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor, *,
                    scale: Optional[float] = None, agent_scale: float = 0.3, residual: float = 0.075,
                    residual_v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(Q A^T s**agent_scale) softmax(A K^T s) V + residual * V`` for (B, H, N, D) tensors.

    ``agents`` (B, H, n, D); k/v may have fewer heads (GQA). ``residual_v`` (B, H|Hkv, N, D): the values added
    by the shortcut term (default ``v``, which then needs as many tokens as ``q``). Both softmax-matmul stages
    run through ``F.scaled_dot_product_attention``.
    """
    if agents.dim() != 4 or agents.shape[:2] != q.shape[:2] or agents.shape[-1] != q.shape[-1]:
        raise ValueError(f"agents must be (B, H, n, D) matching q {tuple(q.shape)}, got {tuple(agents.shape)}")
    s = q.shape[-1] ** -0.5 if scale is None else scale
    gqa = k.shape[1] != q.shape[1]
    va = F.scaled_dot_product_attention(agents, k, v, scale=s, enable_gqa=gqa)       # (B, H, n, D)
    out = F.scaled_dot_product_attention(q, agents, va, scale=s ** agent_scale)
    if residual:
        rv = v if residual_v is None else residual_v
        if rv.shape[2] != q.shape[2]:
            raise ValueError(f"the residual term needs one value per query ({q.shape[2]}), got {rv.shape[2]}; "
                             "pass residual_v or residual=0")
        out = out + residual * _expand_heads(rv, q.shape[1])
    return out


def _pair(x, name: str) -> Tuple[int, int]:
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        x = (int(x), int(x))
    if (not isinstance(x, (tuple, list)) or len(x) != 2
            or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 1 for i in x)):
        raise ValueError(f"{name} must be a positive int or a pair (sy, sx) of positive ints, got {x!r}")
    return int(x[0]), int(x[1])


@register_method("agent")
@dataclass
class Agent(AttentionMethod):
    """AgentSD: agent attention on merged tokens in the early steps, ToMe (or dense) afterwards.

    Defaults are the released AgentSD settings for SD1.5 at 50 steps (``agentsd/README.md`` schedule and
    ``apply_patch`` arguments):

    - ``agent_ratio=0.95``: agents = the N grid tokens minus ``int(N * agent_ratio)`` ToMe-merged ones (capped at
      the src count, so N / (sy*sx) agents with the default stride: 256 at 512 px).
    - ``merge="tome"``: agents by ToMe bipartite merging of the queries; ``"pool"``: average-pool the queries over
      ``agent_stride`` windows (same agent count, no graph needed when ``merge_ratio=0``).
    - ``steps=(0, 20)``: agent phase for steps ``0 <= step < 20`` (ints: step indices; floats in [0, 1]:
      fractions of ``num_steps``). Calls without a step (plain image models) use the agent phase.
    - ``agent_scale=0.3`` (released ``k_scale2``): the query->agent softmax uses ``scale ** agent_scale``.
    - ``residual=0.075`` (released ``k_shortcut``): ``O += residual * V``.
    - ``layers="full_resolution"`` (released ``max_downsample=1``): only layers whose token grid is the model's
      full-resolution grid (``geometry.base_grid``; unknown -> treated as full resolution). Also ``"all"``, an int
      max downsampling factor, or a sequence of layer-name patterns (fnmatch or substring).
    - ``merge_ratio=0.4`` (released ``ratio``): ToMe merges ``int(N * merge_ratio)`` grid tokens before the
      attention and copies the outputs back (0 disables feature merging).
    - ``agent_stride=(4, 4)``: ToMe dst stride (``sx, sy``) in the agent phase; ``after_stride=(2, 2)`` after it.
    - ``after="tome"``: after the agent phase run ToMe-merged softmax attention (the released step-20 patch,
      whose agent count 2048 fails AgentSD's ``2 n < N'`` gate so it is plain ToMe); ``"dense"``: exact attention.
    - ``use_rand=True``: random dst token per window (turned off for odd batches, as released), seeded from the
      geometry (run seed, step, layer) plus ``seed``, never from the global RNG.
    - ``metric="keys"``: ToMe similarity on the keys (the released code uses the block input, which an
      attention processor never sees; see docs/methods/agent.md).

    Agent attention is used only when ``2 * n < N'`` (released gate, N' = tokens after merging); otherwise
    softmax attention on the merged tokens. Text / prefix tokens and cross-attention stay dense.
    """

    agent_ratio: float = 0.95
    merge: str = "tome"
    steps: Tuple[float, float] = (0, 20)
    agent_scale: float = 0.3
    residual: float = 0.075
    layers: Union[str, int, Sequence[str]] = "full_resolution"
    merge_ratio: float = 0.4
    agent_stride: Union[int, Tuple[int, int]] = (4, 4)
    after: str = "tome"
    after_stride: Union[int, Tuple[int, int]] = (2, 2)
    use_rand: bool = True
    metric: str = "keys"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("agent_ratio", "merge_ratio"):
            val = getattr(self, name)
            if not isinstance(val, numbers.Real) or isinstance(val, bool) or not 0.0 <= val < 1.0:
                raise ValueError(f"{name} must be a float in [0, 1), got {val!r}")
        if self.merge not in _MERGES:
            raise ValueError(f"merge must be one of {_MERGES}, got {self.merge!r}")
        if self.after not in _AFTER:
            raise ValueError(f"after must be one of {_AFTER}, got {self.after!r}")
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {self.metric!r}")
        for name in ("agent_scale", "residual"):
            val = getattr(self, name)
            if not isinstance(val, numbers.Real) or isinstance(val, bool) or not math.isfinite(val):
                raise ValueError(f"{name} must be a finite real number, got {val!r}")
        self.agent_stride = _pair(self.agent_stride, "agent_stride")
        self.after_stride = _pair(self.after_stride, "after_stride")
        st = self.steps
        if (not isinstance(st, (tuple, list)) or len(st) != 2
                or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) and x >= 0 for x in st)
                or st[0] > st[1]):
            raise ValueError(f"steps must be (start, stop) with 0 <= start <= stop (ints: step indices, floats in "
                             f"[0, 1]: fractions of num_steps), got {st!r}")
        if any(isinstance(x, float) for x in st) and not all(0.0 <= x <= 1.0 for x in st):
            raise ValueError(f"float steps are fractions of num_steps and must lie in [0, 1], got {st!r}")
        self.steps = tuple(st)
        lay = self.layers
        ok = (lay in ("full_resolution", "all") if isinstance(lay, str) else
              (isinstance(lay, numbers.Integral) and not isinstance(lay, bool) and lay >= 1) or
              (isinstance(lay, (tuple, list)) and all(isinstance(p, str) for p in lay)))
        if not ok:
            raise ValueError(f"layers must be 'full_resolution', 'all', a max downsampling factor (int >= 1) or a "
                             f"sequence of layer-name patterns, got {lay!r}")
        if isinstance(lay, list):
            self.layers = tuple(lay)
        self.last_stats: dict = {}

    def reset(self) -> None:
        """Forget the per-layer path statistics (``last_stats``) of the previous run."""
        self.last_stats.clear()

    # ---- per-call decisions (all from the geometry) -------------------------------------------------------
    def in_agent_phase(self, g: TokenGeometry) -> bool:
        """Whether ``g.step`` falls in ``steps`` (no step known -> True)."""
        if g.step is None:
            return True
        lo, hi = self.steps
        if isinstance(lo, float) or isinstance(hi, float):
            if g.num_steps is None:
                raise ValueError("Agent(steps=...) given as fractions needs geometry.num_steps, which this model's "
                                 "adapter does not provide; give steps as step indices (ints)")
            lo, hi = lo * g.num_steps, hi * g.num_steps
        return lo <= g.step < hi

    def selects_layer(self, g: TokenGeometry) -> bool:
        """Whether agent attention / ToMe applies at this layer (``layers`` option)."""
        lay = self.layers
        if lay == "all":
            return True
        if isinstance(lay, tuple):
            return any(fnmatch.fnmatchcase(g.layer, p) or p in g.layer for p in lay)
        max_down = 1 if lay == "full_resolution" else int(lay)
        base = getattr(g, "base_grid", None)
        if base is None or g.grid is None:
            return True
        down = math.ceil(math.sqrt(math.prod(base) // max(g.num_spatial, 1)))  # as released compute_merge
        return down <= max_down

    def _generator(self, g: TokenGeometry, randomize: bool) -> Optional[torch.Generator]:
        if not randomize:
            return None
        if hasattr(g, "rng"):
            return g.rng("cpu", salt=self.seed)
        gen = torch.Generator()
        gen.manual_seed(zlib.crc32(f"{self.seed}|{g.step}|{g.layer}".encode()))
        return gen

    def graph(self, q: torch.Tensor, k: torch.Tensor, g: TokenGeometry, stride: Tuple[int, int]) -> BipartiteGraph:
        """The ToMe graph of this call's grid tokens (``q``/``k``: the grid part, (B, H, N, D))."""
        src = k if self.metric == "keys" else q
        metric = src.transpose(1, 2).flatten(2)                    # (B, N, H*D)
        randomize = self.use_rand and g.batch % 2 == 0
        return bipartite_graph(metric, tuple(g.grid), stride, generator=self._generator(g, randomize),
                               randomize=randomize)

    def pool_agents(self, q: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Average-pool grid queries (B, H, N, D) over ``agent_stride`` windows -> (B, H, n, D)."""
        b, h, n, d = q.shape
        gh, gw = grid
        sy, sx = self.agent_stride
        img = q.transpose(2, 3).reshape(b, h * d, gh, gw)
        pooled = F.adaptive_avg_pool2d(img, (math.ceil(gh / sy), math.ceil(gw / sx)))
        return pooled.reshape(b, h, d, -1).transpose(2, 3)

    # ---- the method -----------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: TokenGeometry, *,
               scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        g = geometry
        gqa = q.shape[1] != k.shape[1]
        dense = (g.is_cross or g.grid is None or q.shape[2] != k.shape[2] or not self.selects_layer(g))
        agent_phase = not dense and self.in_agent_phase(g)
        if not dense and not agent_phase and self.after == "dense":
            dense = True
        if dense:
            self.last_stats[g.layer] = {"mode": "dense", "tokens": q.shape[2]}
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
        if attn_mask is not None:
            raise ValueError("Agent (AgentSD) cannot honour an attn_mask on merged / agent attention; apply it to "
                             "layers without a mask or use after='dense' with steps=(0, 0)")
        if len(g.grid) != 2:
            raise ValueError(f"Agent supports 2-D token grids (H, W); this layer's grid is {g.grid}")
        sl, n_grid = g.spatial_slice, g.num_spatial
        qs, ks, vs = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        stride = self.agent_stride if agent_phase else self.after_stride
        r = int(n_grid * self.merge_ratio)
        need_graph = r > 0 or (agent_phase and self.merge == "tome")
        graph = self.graph(qs, ks, g, stride) if need_graph else None
        r = graph.clamp(r) if graph is not None else 0
        qm, km, vm = (graph.merge(t, r) for t in (qs, ks, vs)) if r else (qs, ks, vs)
        ne = g.num_extra
        if ne:
            pre, post = slice(0, g.num_prefix), slice(g.num_prefix + n_grid, q.shape[2])
            k_all = torch.cat([k[:, :, pre], km, k[:, :, post]], dim=2)
            v_all = torch.cat([v[:, :, pre], vm, v[:, :, post]], dim=2)
        else:
            k_all, v_all = km, vm
        mode, n_agents = "tome" if r else "dense", 0
        out_m = None
        if agent_phase:
            if self.merge == "tome":
                agent_r = graph.clamp(int(n_grid * self.agent_ratio))
                agents = graph.merge(qs, agent_r)
            else:
                agents = self.pool_agents(qs, tuple(g.grid))
            n_agents = agents.shape[2]
            if 2 * n_agents < qm.shape[2]:                               # the released AgentSD gate
                mode = "agent"
                out_m = agent_attention(qm, k_all, v_all, agents, scale=scale, agent_scale=self.agent_scale,
                                        residual=self.residual, residual_v=vm)
        if out_m is None:
            out_m = F.scaled_dot_product_attention(qm, k_all, v_all, scale=scale, enable_gqa=gqa)
        out_s = graph.unmerge(out_m, r) if r else out_m
        self.last_stats[g.layer] = {"mode": mode, "tokens": n_grid, "merged": qm.shape[2], "agents": n_agents}
        if not ne:
            return out_s
        # extra (text / class) tokens: exact attention over all original keys
        idx = torch.cat([torch.arange(0, g.num_prefix), torch.arange(g.num_prefix + n_grid, q.shape[2])])
        idx = idx.to(q.device)
        out_e = F.scaled_dot_product_attention(q.index_select(2, idx), k, v, scale=scale, enable_gqa=gqa)
        out = torch.empty_like(q)
        out[:, :, sl] = out_s
        out.index_copy_(2, idx, out_e)
        return out
