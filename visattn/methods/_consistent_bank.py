"""`IdentityBank`: the sampled keys/values of a character's identity images, per (step, slot, layer).

Compact by construction: only the sampled tokens (not the full hidden states), only for the (step, layer)
pairs where consistent attention fires, optionally offloaded to CPU (pinned when CUDA is present), with a
byte budget that fails with a clear error instead of an out-of-memory crash, and safetensors save/load so a
character can be reused without re-running its identity images.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

__all__ = ["IdentityBank", "BankMemoryError"]

Key = Tuple[int, int, str]  # (step, slot, layer); slot = call_index * cfg_chunks + cfg_chunk
_FORMAT = "visattn.consistent.bank/1"


class BankMemoryError(MemoryError):
    """Raised when storing into an :class:`IdentityBank` would exceed its ``max_bytes`` budget."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class IdentityBank:
    """Sampled identity tokens (keys and values, post-projection) of one character.

    ``device``: where entries are stored (None: where they are produced; ``"cpu"``: offload, copied back to
    the compute device when read). ``dtype``: storage dtype (None: the model's). ``max_bytes``: budget for
    stored tensors (None: unlimited). ``meta``: free-form JSON-able settings saved with the bank; the method
    records ``sample_rate``, ``gate_seed``, ``gate``, ``gate_switch_step``, ``first_step_plain`` and ``seed``.
    """

    def __init__(self, name: str = "", *, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, max_bytes: Optional[int] = None,
                 meta: Optional[dict] = None) -> None:
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes must be None or a non-negative int, got {max_bytes!r}")
        self.name = name
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.meta: dict = dict(meta or {})
        self._entries: Dict[Key, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._nbytes = 0

    # ------------------------------------------------------------------ storage
    @property
    def nbytes(self) -> int:
        """Bytes held by the stored keys and values."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterator[Key]:
        return iter(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes = 0

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        dt = self.dtype or t.dtype
        dev = self.device or t.device
        if dev.type == "cpu" and t.device.type == "cuda":
            buf = torch.empty(t.shape, dtype=dt, device="cpu", pin_memory=True)
            buf.copy_(t.detach(), non_blocking=True)
            return buf
        return t.detach().to(device=dev, dtype=dt, copy=True).contiguous()

    def put(self, step: int, slot: int, layer: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store sampled keys/values (H_kv, M, D) for one (step, slot, layer); replaces an existing entry."""
        if k.shape != v.shape or k.dim() != 3:
            raise ValueError(f"bank entries are (heads, tokens, head_dim) keys and values of equal shape, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        key = (int(step), int(slot), str(layer))
        itemsize = torch.empty((), dtype=self.dtype or k.dtype).element_size()
        new = 2 * k.numel() * itemsize
        old = sum(t.numel() * t.element_size() for t in self._entries.get(key, ()))
        if self.max_bytes is not None and self._nbytes - old + new > self.max_bytes:
            raise BankMemoryError(
                f"identity bank {self.name!r} would hold {(self._nbytes - old + new) / 2**20:.1f} MiB, over its "
                f"max_bytes budget of {self.max_bytes / 2**20:.1f} MiB (at step {step}, layer {layer!r}). Raise "
                f"max_bytes, offload it (bank_device='cpu'), lower sample_rate, use fewer steps or identity "
                f"images, or store it in a smaller dtype (bank_dtype=torch.float16).")
        self._entries[key] = (self._store(k), self._store(v))
        self._nbytes += new - old

    def get(self, step: int, slot: int, layer: str, device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values for (step, slot, layer) moved to ``device``/``dtype``, or None if absent."""
        e = self._entries.get((int(step), int(slot), str(layer)))
        if e is None:
            return None
        return tuple(t.to(device=device or t.device, dtype=dtype or t.dtype, non_blocking=True) for t in e)

    def has_step(self, step: int) -> bool:
        return any(k[0] == step for k in self._entries)

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the bank to a ``.safetensors`` file (metadata: name, settings, dtype)."""
        from safetensors.torch import save_file

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # pinned offload copies are asynchronous
        tensors = {}
        for (step, slot, layer), (k, v) in self._entries.items():
            tensors[f"{step}|{slot}|{layer}|k"] = k.contiguous().cpu()
            tensors[f"{step}|{slot}|{layer}|v"] = v.contiguous().cpu()
        meta = {"format": _FORMAT, "name": self.name, "meta": json.dumps(self.meta)}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, device: Union[str, torch.device, None] = "cpu",
             dtype: Optional[torch.dtype] = None, max_bytes: Optional[int] = None) -> "IdentityBank":
        """Read a bank written by :meth:`save`; entries are placed on ``device`` (default CPU: offloaded)."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no identity bank at {path!r}")
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path!r} is not a visattn identity bank (format {meta.get('format')!r}, "
                                 f"expected {_FORMAT!r})")
            bank = cls(meta.get("name", ""), device=device, dtype=dtype, max_bytes=max_bytes,
                       meta=json.loads(meta.get("meta", "{}")))
            pairs: Dict[Key, dict] = {}
            for name in f.keys():
                step, slot, rest = name.split("|", 2)
                layer, kind = rest.rsplit("|", 1)
                pairs.setdefault((int(step), int(slot), layer), {})[kind] = f.get_tensor(name)
        for (step, slot, layer), kv in sorted(pairs.items()):
            bank.put(step, slot, layer, kv["k"], kv["v"])
        return bank

    def __repr__(self) -> str:
        return (f"IdentityBank(name={self.name!r}, entries={len(self)}, {self.nbytes / 2**20:.2f} MiB, "
                f"device={self.device}, dtype={self.dtype})")
