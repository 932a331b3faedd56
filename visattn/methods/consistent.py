"""`Consistent`: StoryDiffusion's consistent self-attention (CSA), without globals.

Each image's self-attention keys/values are its own tokens plus grid tokens sampled (Bernoulli, rate
``sample_rate``) from other images: the other images of its batch (``batch`` mode, the paper's), or the
identity images of one or more characters stored in an :class:`IdentityBank` (``write`` / ``read`` modes, the
released app's). Queries, projections, scale and output path are the model's own, so no training is needed.

    m = Consistent(sample_rate=0.5)
    with visattn.apply(pipe, m, layers=m.layer_filter()):
        pipe(["a man at the beach", "a man in a cafe"], ...)     # batch mode

    bank = IdentityBank("Bob", device="cpu")
    with m.writing(bank): pipe("a man, black suit", ...)        # identity image(s): fills the bank
    with m.reading(bank): pipe("a man, black suit, on a bus", ...)

Defaults follow the released low-VRAM SDXL app (``gradio_app_sdxl_specific_id_low_vram.py``, see
docs/methods/consistent.md): sa32 = sa64 = 0.5, identity images 1, CSA gate 0.7 before step 20 and 0.9
from step 20, plain attention at step 0, ``up_blocks`` self-attention only.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..geometry import TokenGeometry
from ._consistent_attn import (appended_attention, build_layout, concat_batch_attention, gather_pool,
                               layout_batch_attention, plain_attention, pool_indices)
from ._consistent_bank import BankMemoryError, IdentityBank
from ._consistent_sampling import gate_fires, layer_wanted, sample_mask
from .base import AttentionMethod, register_method
from ..kernels import check_backend_name

__all__ = ["Consistent", "IdentityBank", "BankMemoryError"]

_MODES = ("batch", "write", "read")
_PATHS = ("concat", "layout")


@register_method("consistent")
@dataclass
class Consistent(AttentionMethod):
    """Consistent self-attention. Options (defaults from the released StoryDiffusion SDXL app):

    - ``sample_rate`` (0.5): probability that a grid token of another image is shared (app: sa32 = sa64 = 0.5).
    - ``id_images`` (1): identity images per character, used by ``StoryPipeline`` (app: ``id_length`` 1).
    - ``gate`` ((0.7, 0.9)): probability that CSA runs at a layer before / from ``gate_switch_step``; otherwise
      the layer does plain attention (app: ``random.random() > 0.3`` before step 20, ``> 0.1`` after).
    - ``gate_switch_step`` (20): the step where ``gate[1]`` takes over (app: 20).
    - ``first_step_plain`` (True): step 0 is plain attention everywhere (app: ``cur_step < 1``).
    - ``layers`` ("up"): which self-attention layers share tokens: "up" (UNet ``up_blocks``, as the app; all
      layers of a model without UNet block names), "all", a substring, a tuple of substrings or a callable.
      Other layers get exact plain attention. Pass ``layers=m.layer_filter()`` to ``visattn.apply`` to install
      only where needed.
    - ``seed`` (None): sampling seed; None uses the run seed the adapters derive from the initial noise (so it
      follows the pipeline ``generator``), else 0.
    - ``gate_seed`` (0): seed of the per-(step, layer) gate; fixed so identity and panel runs agree.
    - ``window`` (None): long stories: image i shares tokens only with images j, |i - j| <= window (within
      a CFG chunk). None: all images of the chunk.
    - ``path`` ("concat"): batch-mode kernel path: "concat" (one masked SDPA over own + pooled tokens) or
      "layout" (block-sparse dispatcher); same result.
    - ``backend`` ("auto"): backend of ``visattn.kernels.block_sparse_attention`` for ``path="layout"``.
    """

    sample_rate: float = 0.5
    id_images: int = 1
    gate: Tuple[float, float] = (0.7, 0.9)
    gate_switch_step: int = 20
    first_step_plain: bool = True
    layers: Union[str, Sequence[str], Callable[[str], bool]] = "up"
    seed: Optional[int] = None
    gate_seed: int = 0
    window: Optional[int] = None
    path: str = "concat"
    backend: str = "auto"

    #: the layers the method wants by default (adapters / StoryPipeline pass ``layer_filter()`` as ``layers=``)
    preferred_layers = "up"

    def __post_init__(self) -> None:
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, (int, float)) or \
                not 0.0 <= float(self.sample_rate) <= 1.0 or math.isnan(float(self.sample_rate)):
            raise ValueError(f"sample_rate must be a number in [0, 1], got {self.sample_rate!r}")
        check_backend_name(self.backend)
        if not isinstance(self.id_images, int) or self.id_images < 1:
            raise ValueError(f"id_images must be an int >= 1, got {self.id_images!r}")
        g = tuple(self.gate) if isinstance(self.gate, (tuple, list)) else (self.gate, self.gate)
        if len(g) != 2 or not all(isinstance(p, (int, float)) and 0.0 <= p <= 1.0 for p in g):
            raise ValueError(f"gate must be a probability in [0, 1] or a pair of them, got {self.gate!r}")
        self.gate = (float(g[0]), float(g[1]))
        if not isinstance(self.gate_switch_step, int) or self.gate_switch_step < 0:
            raise ValueError(f"gate_switch_step must be an int >= 0, got {self.gate_switch_step!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {self.window!r}")
        if self.path not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}, got {self.path!r}")
        if not (self.layers in ("up", "all") or callable(self.layers) or isinstance(self.layers, (str, tuple, list))):
            raise ValueError(f"layers must be 'up', 'all', a substring, a tuple of substrings or a callable, "
                             f"got {self.layers!r}")
        self._mode = "batch"
        self._banks: List[IdentityBank] = []
        self._calls: Dict[Tuple[int, str], int] = {}
        self._last_step = -1
        self._layouts: Dict[tuple, object] = {}
        self._samples: Dict[tuple, torch.Tensor] = {}
        self._pools: Dict[tuple, tuple] = {}
        self.stats: Dict[str, int] = {"csa_calls": 0, "plain_calls": 0}

    # ------------------------------------------------------------------ modes
    @property
    def mode(self) -> str:
        """"batch" (share within the batch), "write" (batch + store into a bank) or "read" (append banks)."""
        return self._mode

    def reset(self) -> None:
        """Forget per-run state (call counters, cached samples/layouts); banks and mode are kept."""
        self._calls.clear()
        self._last_step = -1
        self._layouts.clear()
        self._samples.clear()
        self._pools.clear()

    def set_batch(self) -> None:
        """Batch mode: images of a batch share sampled tokens with each other (no bank)."""
        self._mode, self._banks = "batch", []
        self.reset()

    def set_write(self, bank: IdentityBank) -> None:
        """Write mode: batch mode among the identity images, and their sampled tokens go into ``bank``."""
        if not isinstance(bank, IdentityBank):
            raise TypeError(f"bank must be an IdentityBank, got {type(bank).__name__}")
        bank.meta.update(self._bank_meta())
        self._mode, self._banks = "write", [bank]
        self.reset()

    def set_read(self, *banks: IdentityBank) -> None:
        """Read mode: every image attends to its own tokens plus the tokens of ``banks`` (one per character)."""
        if not banks or not all(isinstance(b, IdentityBank) for b in banks):
            raise TypeError("set_read needs one or more IdentityBank objects")
        for b in banks:
            for key in ("gate_seed", "gate", "gate_switch_step", "first_step_plain"):
                have, want = b.meta.get(key), self._bank_meta()[key]
                if have is not None and (list(have) if isinstance(have, (list, tuple)) else have) != want:
                    raise ValueError(f"bank {b.name!r} was written with {key}={have!r} but this method has "
                                     f"{key}={want!r}; they must match so the same layers share tokens")
        self._mode, self._banks = "read", list(banks)
        self.reset()

    @contextlib.contextmanager
    def writing(self, bank: IdentityBank) -> Iterator[IdentityBank]:
        """Context manager form of :meth:`set_write` (back to batch mode on exit)."""
        self.set_write(bank)
        try:
            yield bank
        finally:
            self.set_batch()

    @contextlib.contextmanager
    def reading(self, *banks: IdentityBank) -> Iterator[None]:
        """Context manager form of :meth:`set_read` (back to batch mode on exit)."""
        self.set_read(*banks)
        try:
            yield
        finally:
            self.set_batch()

    def _bank_meta(self) -> dict:
        return {"sample_rate": float(self.sample_rate), "gate_seed": self.gate_seed, "gate": list(self.gate),
                "gate_switch_step": self.gate_switch_step, "first_step_plain": self.first_step_plain}

    def layer_filter(self) -> Callable[[str], bool]:
        """Predicate on module names for ``visattn.apply(..., layers=)``: self-attention layers selected by
        ``layers`` (UNet ``attn1`` only; every layer of other models)."""
        layers = self.layers

        def keep(name: str) -> bool:
            if "attn2" in name:  # UNet cross-attention never shares tokens
                return False
            return layer_wanted(layers, name)

        return keep

    # ------------------------------------------------------------------ attention
    def _step(self, geometry: TokenGeometry) -> int:
        if geometry.step is None:
            if self._mode != "batch":
                raise ValueError("Consistent in write/read mode needs the denoising step in the geometry "
                                 "(apply it with visattn.apply on a pipeline or denoiser)")
            return 0
        return int(geometry.step)

    def _sample(self, geometry: TokenGeometry, step: int, n: int, device) -> torch.Tensor:
        seed = self.seed if self.seed is not None else (geometry.seed if geometry.seed is not None else 0)
        key = (seed, step, tuple(geometry.grid), n, str(device))
        sel = self._samples.get(key)
        if sel is None:
            if len(self._samples) > 64:
                self._samples.clear()
            sel = sample_mask(seed, step, geometry.grid, n, float(self.sample_rate)).to(device)
            self._samples[key] = sel
        return sel

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: TokenGeometry, *,
               scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        step = self._step(geometry)
        if step < self._last_step:  # a new run without reset(): start the counters again
            self.reset()
        self._last_step = step
        active = (not geometry.is_cross and geometry.grid is not None and self.sample_rate > 0
                  and layer_wanted(self.layers, geometry.layer)
                  and gate_fires(self.gate_seed, step, geometry.layer, self.gate, self.gate_switch_step,
                                 self.first_step_plain))
        chunks = max(1, geometry.cfg_chunks)
        if q.shape[0] % chunks:
            raise ValueError(f"batch {q.shape[0]} is not divisible by cfg_chunks={chunks}")
        if active and attn_mask is not None:
            raise ValueError("Consistent cannot combine token sharing with a model attention mask; restrict "
                             "`layers` to layers without masks")
        slot0 = 0
        if self._mode != "batch":
            ck = (step, geometry.layer)
            call = self._calls.get(ck, 0)
            self._calls[ck] = call + 1
            slot0 = call * chunks  # separate CFG passes (or multi-eval samplers) get their own slots
        if not active:
            self.stats["plain_calls"] += 1
            return plain_attention(q, k, v, scale, attn_mask)
        self.stats["csa_calls"] += 1
        if self._mode == "read":
            return self._read(q, k, v, geometry, step, slot0, chunks, scale)
        return self._batch(q, k, v, geometry, step, slot0, chunks, scale)

    def _batch(self, q, k, v, geometry, step, slot0, chunks, scale) -> torch.Tensor:
        n = q.shape[0] // chunks
        sel = self._sample(geometry, step, n, q.device)
        # pool indices and layouts depend on the sample (seed, step, grid) and on where the grid sits: cache them
        # under one key so a new seed never reuses a stale layout and the nonzero() sync runs once per sample
        seed = self.seed if self.seed is not None else (geometry.seed if geometry.seed is not None else 0)
        pkey = (seed, step, n, geometry.seq_len, geometry.num_prefix, tuple(geometry.grid), str(q.device))
        pooled = self._pools.get(pkey)
        if pooled is None:
            if len(self._pools) > 64:
                self._pools.clear()
            pooled = self._pools[pkey] = pool_indices(sel, geometry)
        owner, flat = pooled
        if self._mode == "write":
            pk, pv = gather_pool(k, v, flat, chunks)
            for c in range(chunks):
                self._banks[0].put(step, slot0 + c, geometry.layer, pk[c], pv[c])
        if n == 1 or owner.numel() == 0:
            return plain_attention(q, k, v, scale)
        if self.window is not None and self.window < n - 1:
            return self._windowed(q, k, v, geometry, sel, chunks, scale)
        if self.path == "layout":
            layout = self._layouts.get(pkey)
            if layout is None:
                if len(self._layouts) > 16:
                    self._layouts.clear()
                layout = self._layouts[pkey] = build_layout(n, geometry.seq_len, flat, q.device)
            return layout_batch_attention(q, k, v, layout, chunks, scale, self.backend)
        pk, pv = gather_pool(k, v, flat, chunks)
        return concat_batch_attention(q, k, v, pk, pv, owner, chunks, scale)

    def _windowed(self, q, k, v, geometry, sel, chunks, scale) -> torch.Tensor:
        """Image i shares with images within ``window`` of it: one concat call per image (long stories)."""
        B, H, N, D = q.shape
        n = B // chunks
        qv, kv_, vv = (t.view(chunks, n, *t.shape[1:]) for t in (q, k, v))
        outs = []
        for i in range(n):
            js = [j for j in range(max(0, i - self.window), min(n, i + self.window + 1)) if j != i]
            ek, ev = [kv_[:, i]], [vv[:, i]]
            for j in js:
                idx = sel[j].nonzero().squeeze(1) + geometry.num_prefix
                ek.append(kv_[:, j].index_select(2, idx))
                ev.append(vv[:, j].index_select(2, idx))
            outs.append(plain_attention(qv[:, i], torch.cat(ek, 2), torch.cat(ev, 2), scale))
        return torch.stack(outs, 1).reshape(B, H, N, D)

    def _read(self, q, k, v, geometry, step, slot0, chunks, scale) -> torch.Tensor:
        eks, evs = [], []
        for c in range(chunks):
            parts_k, parts_v = [], []
            for bank in self._banks:
                e = bank.get(step, slot0 + c, geometry.layer, device=q.device, dtype=k.dtype)
                if e is None:
                    raise KeyError(
                        f"identity bank {bank.name!r} has no entry for step {step}, CFG slot {slot0 + c}, layer "
                        f"{geometry.layer!r}: panels must use the same scheduler, step count, guidance (CFG on "
                        f"or off) and attention layers as the identity images that wrote the bank")
                if e[0].shape[0] != k.shape[1] or e[0].shape[2] != k.shape[3]:
                    raise ValueError(f"bank {bank.name!r} entry at layer {geometry.layer!r} has heads/head_dim "
                                     f"{tuple(e[0].shape[::2])}, the model has {(k.shape[1], k.shape[3])}")
                parts_k.append(e[0])
                parts_v.append(e[1])
            eks.append(torch.cat(parts_k, 1))
            evs.append(torch.cat(parts_v, 1))
        return appended_attention(q, k, v, torch.stack(eks), torch.stack(evs), chunks, scale)

    def pattern(self, geometry: TokenGeometry, query_index: int) -> Optional[torch.Tensor]:
        """Within one image every key is kept; the appended tokens depend on other images (not shown)."""
        return torch.ones(geometry.kv_len, dtype=torch.bool)
