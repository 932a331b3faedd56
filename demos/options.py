"""Option specs for registered methods: turn a method's dataclass fields into UI controls and back.

Every registered method (``visattn.list_methods()``) gets its controls from its config fields, so a new
method appears in the demo without touching the demo. A field may refine its control with
``dataclasses.field(metadata=...)`` keys ``min``, ``max``, ``step``, ``choices`` and ``help``; ``Literal[...]``
annotations become dropdowns.
"""
from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visattn.methods import get_method, list_methods
from visattn.methods.base import _REGISTRY, method_options

__all__ = ["OptionSpec", "option_specs", "parse_option", "build_method", "method_doc"]

#: fallback ranges for integer options by name fragment (used when the field gives no metadata)
_INT_RANGES = {"kernel": (1, 63), "window": (1, 63), "dilation": (1, 16), "stride": (1, 16), "block": (1, 256),
               "topk": (1, 64), "top_k": (1, 64), "region": (1, 64), "agent": (1, 256), "num": (0, 1024)}


@dataclass
class OptionSpec:
    """One option of a method as the UI shows it.

    ``kind``: "int", "float", "bool", "choice" (``choices`` set), or "text" (parsed with
    :func:`parse_option`: tuples, optionals, anything else literal).
    """

    name: str
    kind: str
    default: Any
    choices: Optional[List[Any]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None
    help: str = ""
    annotation: Any = None

    @property
    def default_text(self) -> str:
        """The default as the text a Textbox shows."""
        if self.default is None:
            return ""
        if isinstance(self.default, (tuple, list)):
            return ", ".join(str(v) for v in self.default)
        if isinstance(self.default, enum.Enum):
            return str(self.default.value)
        return str(self.default)


def _method_class(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {list_methods()}")
    return _REGISTRY[name]


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _strip_optional(tp: Any) -> Tuple[Any, bool]:
    """(inner type, was Optional) for ``Optional[X]``; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _discovered_choices(cls, name: str, default: Any) -> Optional[List[str]]:
    """Allowed values of a str option found next to the method: a module constant such as ``_MERGES`` for
    ``merge``, a docstring alternative list like ``strategy``: "auto" | "packed", or the kernel backends
    for ``backend``. Only used when the default is one of them."""
    if not isinstance(default, str):
        return None
    module = sys.modules.get(cls.__module__)
    found: Optional[List[str]] = None
    if module is not None:
        up = name.upper()
        for const in (f"_{up}S", f"_{up}", f"{up}S", f"{up}_CHOICES", f"_{up}_CHOICES", f"_{up}ES"):
            val = getattr(module, const, None)
            if isinstance(val, (tuple, list, frozenset, set)) and val and all(isinstance(v, str) for v in val):
                found = list(val) if not isinstance(val, (set, frozenset)) else sorted(val)
                break
        if found is None:
            try:
                source = inspect.getsource(module)
            except (OSError, TypeError):
                source = ""
            m = re.search(r"``%s``[^\n]*?((?:\"[\w.-]+\"\s*\|\s*)+\"[\w.-]+\")" % re.escape(name), source)
            if m:
                found = re.findall(r'"([\w.-]+)"', m.group(1))
    if found is None and name == "backend":
        try:
            from visattn.kernels.dispatch import available_backends
            found = ["auto"] + [b for b in available_backends() if b != "auto"]
        except Exception:  # noqa: BLE001 - no kernel registry: leave it a text field
            found = None
    return found if found and default in found else None


def _int_range(name: str) -> Tuple[Optional[int], Optional[int]]:
    for frag, rng in _INT_RANGES.items():
        if frag in name:
            return rng
    return (None, None)


def option_specs(method: str) -> List[OptionSpec]:
    """The UI specs of every option of the registered method ``method`` (in field order)."""
    cls = _method_class(method)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    specs = []
    for f in method_options(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, f.type)
        meta = dict(f.metadata or {})
        default = _field_default(f)
        inner, optional = _strip_optional(tp)
        spec = OptionSpec(name=f.name, kind="text", default=default, help=str(meta.get("help", "")), annotation=tp)
        if "choices" in meta:
            spec.kind, spec.choices = "choice", list(meta["choices"])
        elif typing.get_origin(inner) is typing.Literal:
            spec.kind, spec.choices = "choice", list(typing.get_args(inner))
        elif isinstance(inner, type) and issubclass(inner, enum.Enum):
            spec.kind, spec.choices = "choice", [m.value for m in inner]
            if isinstance(default, enum.Enum):
                spec.default = default.value
        elif optional:
            spec.kind = "text"
        elif inner is str and _discovered_choices(cls, f.name, default):
            spec.kind, spec.choices = "choice", _discovered_choices(cls, f.name, default)
        elif inner is bool:
            spec.kind = "bool"
        elif inner is int:
            spec.kind = "int"
            lo, hi = _int_range(f.name)
            spec.minimum, spec.maximum, spec.step = meta.get("min", lo), meta.get("max", hi), meta.get("step", 1)
            if isinstance(default, int) and spec.maximum is not None and default > spec.maximum:
                spec.maximum = default
        elif inner is float:
            spec.kind = "float"
            spec.minimum, spec.maximum, spec.step = meta.get("min"), meta.get("max"), meta.get("step", 0.01)
        if spec.kind == "choice" and optional and None not in spec.choices:
            spec.choices = [None] + spec.choices
        specs.append(spec)
    return specs


def parse_option(spec: OptionSpec, value: Any) -> Any:
    """Convert a UI value to the option's Python value; raises ValueError naming the option and what is allowed."""
    name = spec.name
    if spec.kind == "bool":
        if isinstance(value, str):
            if value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if value.strip().lower() in ("false", "0", "no", "off", ""):
                return False
            raise ValueError(f"option {name!r}: expected true/false, got {value!r}")
        return bool(value)
    if spec.kind == "choice":
        choices = spec.choices or []
        if value in choices:
            return value
        for c in choices:  # values that came through text (client calls, "None")
            if str(c) == str(value):
                return c
        raise ValueError(f"option {name!r}: {value!r} is not allowed; allowed values: {choices}")
    if spec.kind in ("int", "float"):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"option {name!r}: a number is required")
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"option {name!r}: expected a number, got {value!r}") from None
        if spec.kind == "int":
            if num != int(num):
                raise ValueError(f"option {name!r}: expected an integer, got {value!r}")
            num = int(num)
        if spec.minimum is not None and num < spec.minimum or spec.maximum is not None and num > spec.maximum:
            raise ValueError(f"option {name!r}={num} is out of range; allowed: {spec.minimum} to {spec.maximum}")
        return num
    # text: literal syntax, comma lists become tuples, empty means None (the "not set" value)
    if value is None:
        return None
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text == "" or text.lower() == "none":
        return None
    try:
        parsed = ast.literal_eval(text if "," not in text or text[0] in "([{" else f"({text},)")
    except (ValueError, SyntaxError):
        if isinstance(spec.default, str) or spec.annotation is str:
            return text
        raise ValueError(f"option {name!r}: could not read {value!r}; write a number, a comma list such as "
                         f"'7, 7', or leave it empty for None (default: {spec.default_text or 'None'})") from None
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return parsed


def build_method(method: str, values: Dict[str, Any]):
    """Instantiate ``method`` from UI values (a dict name -> raw UI value); errors are readable ValueErrors."""
    specs = {s.name: s for s in option_specs(method)}
    unknown = [k for k in values if k not in specs]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; allowed: {list(specs)}")
    kwargs = {k: parse_option(specs[k], v) for k, v in values.items()}
    try:
        return get_method(method, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"method {method!r} rejected its options {kwargs}: {e}") from None


def method_doc(method: str) -> str:
    """First paragraph of the method class docstring (shown under the dropdown)."""
    doc = (_method_class(method).__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ") if doc else ""


def default_values(method: str) -> Dict[str, Any]:
    """The UI values that reproduce the method's defaults."""
    out = {}
    for s in option_specs(method):
        out[s.name] = s.default_text if s.kind == "text" else s.default
    return out


def methods() -> Sequence[str]:
    """Registered method names, dense first."""
    names = list_methods()
    return (["dense"] if "dense" in names else []) + [n for n in names if n != "dense"]
