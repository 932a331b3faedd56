"""Placeholder: `apply` / `remove` land with issue 2 (adapters)."""
__all__ = ["apply", "remove", "Handle"]


def apply(target, method, *, layers="self", **options):  # pragma: no cover - replaced by issue 2
    raise NotImplementedError


def remove(target):  # pragma: no cover
    raise NotImplementedError


class Handle:  # pragma: no cover
    pass
