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
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..geometry import TokenGeometry
from ._agent_graph import GraphRunner, graph_eligible
from ._tome import (BipartiteGraph, TomeCache, _to_device, bipartite_graph, graph_from_partition,
                    partition_host)
from .base import AttentionMethod, register_method

__all__ = ["Agent", "agent_attention"]

_MERGES = ("tome", "pool")
_AFTER = ("tome", "dense")
_METRICS = ("keys", "queries")
#: ``cuda_graph="auto"`` captures layers with at most this many grid tokens per image (launch-bound sizes)
GRAPH_AUTO_MAX_TOKENS = 32768


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
        out = torch.add(out, _expand_heads(rv, q.shape[1]), alpha=residual)           # one fused kernel
    return out


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D); a view when x is a head-split view of token-major memory (what the diffusers
    and timm processors hand over), a copy otherwise."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D) view."""
    b, n, c = x.shape
    return x.view(b, n, h, c // h).transpose(1, 2)


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
    - ``cuda_graph="auto"``: not an algorithm option. On CUDA, for inference, the device work of an agent/ToMe
      layer (~40 small kernels) is captured once per shape and replayed, which removes ~2 ms of host launch
      overhead per call; same kernels, same numbers. ``"auto"``: only layers with at most 32,768 grid tokens per
      image (above that the layer is GPU-bound and the graph's memory pool is not worth it); ``True``: always;
      ``False``: never. ``last_stats[layer]["cuda_graph"]`` is True on replayed calls.

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
    cuda_graph: Union[bool, str] = field(default="auto", metadata={
        "choices": ["auto", True, False],
        "help": "CUDA graph replay of the layer's device work (execution only, same numbers)"})

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
        if self.cuda_graph not in (True, False, "auto"):
            raise ValueError(f"cuda_graph must be True, False or 'auto', got {self.cuda_graph!r}")
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
        self._cache = TomeCache()        # data-independent index tensors per (shape, device); not a field
        self._graphs = GraphRunner()     # captured device work per layer shape (cuda_graph); kept across runs

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
        return self._graph(_tokens(src), g, stride)

    def _graph(self, metric: torch.Tensor, g: TokenGeometry, stride: Tuple[int, int]) -> BipartiteGraph:
        randomize = self.use_rand and g.batch % 2 == 0
        return bipartite_graph(metric, tuple(g.grid), stride, generator=self._generator(g, randomize),
                               randomize=randomize, cache=self._cache)

    def pool_agents(self, q: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Average-pool grid queries (B, H, N, D) over ``agent_stride`` windows -> (B, H, n, D)."""
        h = q.shape[1]
        return _heads(self._pool_tokens(_tokens(q), grid), h)

    def _pool_tokens(self, q2: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Token-major pooling: (B, N, C) -> (B, n, C), as a channels-last image (no transpose copy)."""
        b, n, c = q2.shape
        gh, gw = grid
        sy, sx = self.agent_stride
        img = q2.reshape(b, gh, gw, c).permute(0, 3, 1, 2)            # NCHW view of channels-last memory
        pooled = F.adaptive_avg_pool2d(img, (math.ceil(gh / sy), math.ceil(gw / sx)))
        return pooled.permute(0, 2, 3, 1).reshape(b, -1, c)

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
        h, hk = q.shape[1], k.shape[1]
        ne = g.num_extra
        qs, ks, vs = (q, k, v) if not ne else (q[:, :, sl], k[:, :, sl], v[:, :, sl])
        # token-major (B, N, H*D) views: the processors' q/k/v are head-split views of such memory, so these are free
        q2, k2, v2 = _tokens(qs), _tokens(ks), _tokens(vs)
        stride = self.agent_stride if agent_phase else self.after_stride
        r = int(n_grid * self.merge_ratio)
        tome_agents = agent_phase and self.merge == "tome"
        perm_host, ns, nd = None, 0, 0
        if r > 0 or tome_agents:                                  # the dst/src partition, drawn on the host
            randomize = self.use_rand and g.batch % 2 == 0
            perm_host, ns, nd = self._partition_host(tuple(g.grid), stride, g, randomize, q.device)
        clamp = (lambda x: max(0, min(int(x), ns)) if nd else 0)  # BipartiteGraph.clamp, from the sizes alone
        r = clamp(r)
        n_merged = n_grid - r
        # the released gate (agents only if 2 n < N') is decided from the sizes alone, before any agent is built
        agent_r = clamp(int(n_grid * self.agent_ratio)) if tome_agents else 0
        if not agent_phase:
            n_agents = 0
        elif tome_agents:
            n_agents = n_grid - agent_r
        else:
            sy, sx = self.agent_stride
            n_agents = math.ceil(g.grid[0] / sy) * math.ceil(g.grid[1] / sx)
        use_agents = agent_phase and 2 * n_agents < n_merged
        plan = (tuple(g.grid), ns, nd, r, agent_r if (use_agents and tome_agents) else 0, use_agents, h, hk, scale,
                self.agent_scale, self.residual, self.metric, self.agent_stride)
        stats = {"mode": "agent" if use_agents else ("tome" if r else "dense"), "tokens": n_grid, "merged": n_merged,
                 "agents": n_agents}
        out2 = None
        if perm_host is not None and not ne and self._use_graph(n_grid, q, k, v):
            key = plan + (tuple(q2.shape), tuple(k2.shape), tuple(v2.shape), q2.dtype, k2.dtype, v2.dtype,
                          str(q.device))
            out2 = self._graphs.run(key, lambda a, b_, c, p: self._core(a, b_, c, p, plan), [q2, k2, v2], perm_host,
                                    keep=lambda: list(self._cache._d.values()))
            if out2 is not None:
                stats["cuda_graph"] = True
        if out2 is None:
            perm = None
            if perm_host is not None:
                perm = (self._cache.get(("perm", tuple(g.grid), stride, str(q.device)),
                                        lambda: _to_device(perm_host, q.device))
                        if not (self.use_rand and g.batch % 2 == 0) else _to_device(perm_host, q.device))
            extra = None
            if ne:
                pre, post = slice(0, g.num_prefix), slice(g.num_prefix + n_grid, q.shape[2])
                extra = (k[:, :, pre], k[:, :, post], v[:, :, pre], v[:, :, post])
            out2 = self._core(q2, k2, v2, perm, plan, extra)
        out_s = _heads(out2, h)
        self.last_stats[g.layer] = stats
        if not ne:
            return out_s
        # extra (text / class) tokens: exact attention over all original keys
        idx = self._cache.get(("extra", g.num_prefix, n_grid, q.shape[2], str(q.device)), lambda: torch.cat([
            torch.arange(0, g.num_prefix), torch.arange(g.num_prefix + n_grid, q.shape[2])]).to(q.device))
        out_e = F.scaled_dot_product_attention(q.index_select(2, idx), k, v, scale=scale, enable_gqa=gqa)
        out = torch.empty_like(q)
        out[:, :, sl] = out_s
        out.index_copy_(2, idx, out_e)
        return out

    def _use_graph(self, n_grid: int, *tensors: torch.Tensor) -> bool:
        mode = self.cuda_graph
        if (n_grid > GRAPH_AUTO_MAX_TOKENS) if mode == "auto" else not mode:
            return False
        return graph_eligible(*tensors)

    def _partition_host(self, grid, stride, g: TokenGeometry, randomize: bool, device):
        """Host [src | dst] partition: a fresh random draw per call (seeded by the geometry), or the cached
        deterministic one (odd batches / ``use_rand=False``). Pinned on CUDA, for a non-blocking copy."""
        pin = torch.device(device).type == "cuda"
        if randomize:
            return partition_host(grid, stride, generator=self._generator(g, True), randomize=True, pin=pin)
        return self._cache.get(("perm_host", grid, stride, pin),
                               lambda: partition_host(grid, stride, randomize=False, pin=pin))

    def _core(self, q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, perm: Optional[torch.Tensor], plan: tuple,
              extra: Optional[tuple] = None) -> torch.Tensor:
        """Device work of one agent / ToMe layer on the grid tokens (token-major (B, N, C) in and out): graph,
        merge, agents, attention, unmerge. No host reads, so it can be captured in a CUDA graph."""
        grid, ns, nd, r, agent_r, use_agents, h, hk, scale, agent_scale, residual, metric, _ = plan
        graph = None
        if perm is not None:
            graph = graph_from_partition(k2 if metric == "keys" else q2, perm, ns, nd, cache=self._cache)
        if r:
            qm2, km2, vm2 = graph.merge_tokens([q2, k2, v2], r)           # one index_add for q, k and v
            qm, km, vm = _heads(qm2, h), _heads(km2, hk), _heads(vm2, hk)
        else:
            qm, km, vm = _heads(q2, h), _heads(k2, hk), _heads(v2, hk)
        if extra is not None:
            k_pre, k_post, v_pre, v_post = extra
            k_all, v_all = torch.cat([k_pre, km, k_post], dim=2), torch.cat([v_pre, vm, v_post], dim=2)
        else:
            k_all, v_all = km, vm
        if use_agents:
            agents2 = graph.merge_tokens([q2], agent_r)[0] if agent_r else self._pool_tokens(q2, grid)
            out_m = agent_attention(qm, k_all, v_all, _heads(agents2, h), scale=scale, agent_scale=agent_scale,
                                    residual=residual, residual_v=vm)
        else:
            out_m = F.scaled_dot_product_attention(qm, k_all, v_all, scale=scale, enable_gqa=h != hk)
        out2 = _tokens(out_m)
        return graph.unmerge_tokens(out2, r) if r else out2
