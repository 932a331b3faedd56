"""CUDA-graph replay of AgentSD's per-layer device work (used by :class:`visattn.methods.Agent`).

One agent/ToMe layer call is ~40 small kernels (similarity, argmax, sort, index arithmetic, one index_add per
merge, two attentions, one gather). Issuing them from Python costs ~2 ms of host time on the H100 host, more than
their GPU time at 512-1024 px, so the layer is launch-bound. All shapes are known on the host and nothing reads a
device value back, so the whole device part can be captured once per layer shape and replayed: per call the host
then copies q/k/v and the dst partition into static buffers, replays, and clones the output.

Safety rules kept here:
- capture only for inference (no autograd recording), on CUDA, outside another capture;
- warm-up runs on a side stream before capture (cuBLAS/cuDNN plans, cached index tensors);
- tensors the graph reads from the caller's cache are kept alive with the graph (``keep``);
- all graphs of one runner share one memory pool and are replayed one at a time on the caller's stream;
- a failed capture is remembered per key and the caller runs eagerly (a warning says so once).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["GraphRunner", "graph_eligible"]


def graph_eligible(*tensors: torch.Tensor) -> bool:
    """Whether a CUDA graph may be used for a call on these tensors (CUDA, no autograd recording, not capturing)."""
    t = tensors[0]
    if not t.is_cuda:
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    return True


class _Entry:
    __slots__ = ("graph", "static_in", "static_perm", "static_out", "keep")

    def __init__(self, graph, static_in, static_perm, static_out, keep):
        self.graph, self.static_in, self.static_perm, self.static_out, self.keep = (
            graph, static_in, static_perm, static_out, keep)


class GraphRunner:
    """Captured graphs keyed by the caller's (shape, options) key."""

    def __init__(self, warmup: int = 2, max_entries: int = 16) -> None:
        self.warmup = warmup
        self.max_entries = max_entries  # more shapes than this (e.g. many resolutions): the oldest is dropped
        self._entries: Dict[tuple, _Entry] = {}
        self.failed: Dict[tuple, str] = {}
        self._pools: Dict[torch.device, object] = {}
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        self._entries.clear()
        self._pools.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, key: tuple, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
            perm_host: torch.Tensor, keep: Callable[[], List[object]] = list) -> Optional[torch.Tensor]:
        """``fn(*inputs, perm)`` through a graph: a fresh output tensor, or None when this key cannot be captured.

        ``perm_host``: the (pinned) host tensor copied into the graph's perm buffer before each replay.
        ``keep()``: objects the captured kernels read besides the inputs (cached index tensors)."""
        if key in self.failed:
            return None
        e = self._entries.get(key)
        if e is None:
            if len(self._entries) >= self.max_entries:  # bounded GPU memory: drop the oldest captured shape
                self._entries.pop(next(iter(self._entries)))
            e = self._capture(key, fn, inputs, perm_host, keep)
            if e is None:
                return None
        for s, x in zip(e.static_in, inputs):
            s.copy_(x)
        e.static_perm.copy_(perm_host, non_blocking=True)
        e.graph.replay()
        self.replays += 1
        return e.static_out.clone()

    def _capture(self, key, fn, inputs, perm_host, keep) -> Optional[_Entry]:
        dev = inputs[0].device
        try:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable in and out of inference mode
                return self._capture_plain(key, fn, inputs, perm_host, keep, dev)
        except Exception as exc:  # pragma: no cover - GPU only
            self.failed[key] = f"{type(exc).__name__}: {exc}"[:300]
            warnings.warn(f"visattn Agent: CUDA graph capture failed for {key[:3]}..., running eagerly: "
                          f"{self.failed[key]}", RuntimeWarning, stacklevel=4)
            return None

    def _capture_plain(self, key, fn, inputs, perm_host, keep, dev) -> _Entry:
        """Allocate the static buffers, warm up on a side stream, capture; raises on failure."""
        static_in = [torch.empty(x.shape, dtype=x.dtype, device=dev) for x in inputs]
        for s, x in zip(static_in, inputs):
            s.copy_(x)
        static_perm = torch.empty(perm_host.shape, dtype=perm_host.dtype, device=dev)
        static_perm.copy_(perm_host, non_blocking=True)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static_in, static_perm)
        torch.cuda.current_stream(dev).wait_stream(side)
        pool = self._pools.get(dev)
        if pool is None:
            pool = self._pools[dev] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            static_out = fn(*static_in, static_perm)
        self.captures += 1
        e = self._entries[key] = _Entry(graph, static_in, static_perm, static_out, keep())
        return e
