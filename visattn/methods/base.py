"""Method base class and the open registry (`register_method`, `list_methods`, `get_method`)."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, List, Optional, Type, Union

import torch

from ..geometry import TokenGeometry

__all__ = ["AttentionMethod", "register_method", "list_methods", "get_method", "method_options"]

_REGISTRY: Dict[str, Type["AttentionMethod"]] = {}


class AttentionMethod:
    """Base for method configs. Subclasses are dataclasses whose fields are the method's options.

    A method turns ``q, k, v`` of shape (B, H, N, D) (k/v may have fewer heads, GQA) plus a
    :class:`TokenGeometry` into the attention output (B, H, N, D). It must not keep per-model state in
    globals: anything per step or per layer comes from the geometry.
    """

    name: ClassVar[str] = ""
    #: which attention kinds the method replaces by default: "self" or "cross" (adapters filter with it)
    applies_to: ClassVar[str] = "self"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: TokenGeometry, *,
               scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention output (B, H, N, D). ``attn_mask``: an additive float or bool mask the *model* passes
        (Swin's relative-position bias, padding); a method that cannot honour one must raise ValueError."""
        raise NotImplementedError

    def __call__(self, q, k, v, geometry: TokenGeometry, *, scale: Optional[float] = None,
                 attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.attend(q, k, v, geometry, scale=scale, attn_mask=attn_mask)

    def pattern(self, geometry: TokenGeometry, query_index: int) -> Optional[torch.Tensor]:
        """Bool (kv_len,) of the keys query ``query_index`` attends under ``geometry`` (for the pattern
        explorer and docs); None when the pattern depends on the data (it is then shown as unknown)."""
        return None

    def layout_stats(self, geometry: TokenGeometry) -> Optional[dict]:
        """Block statistics of the layout this method would use for ``geometry`` (None if not block-sparse)."""
        return None

    def reset(self) -> None:
        """Forget per-run state (called when the method is applied and when a new generation starts)."""


def register_method(name: str):
    """Class decorator: register a method config class under ``name`` (``visattn.apply(m, name)``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, AttentionMethod)):
            raise TypeError(f"register_method expects an AttentionMethod subclass, got {cls!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> List[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def method_options(cls_or_obj) -> List[dataclasses.Field]:
    """The option fields of a method config (dataclass fields)."""
    return list(dataclasses.fields(cls_or_obj))


def get_method(method: Union[str, AttentionMethod], **options: Any) -> AttentionMethod:
    """Resolve a name or instance to a method instance; unknown names/options raise ``ValueError``."""
    if isinstance(method, AttentionMethod):
        if options:
            known = [f.name for f in method_options(method)]
            bad = [k for k in options if k not in known]
            if bad:
                raise ValueError(f"unknown option(s) {bad} for method {method.name!r}; allowed: {known}")
            return dataclasses.replace(method, **options)
        return method
    if isinstance(method, str):
        if method not in _REGISTRY:
            raise ValueError(f"unknown method {method!r}; known methods: {list_methods()}")
        cls = _REGISTRY[method]
        known = [f.name for f in method_options(cls)]
        bad = [k for k in options if k not in known]
        if bad:
            raise ValueError(f"unknown option(s) {bad} for method {method!r}; allowed: {known}")
        return cls(**options)
    raise TypeError(f"method must be a registered name (str) or an AttentionMethod instance, got "
                    f"{type(method).__name__}; known methods: {list_methods()}")
