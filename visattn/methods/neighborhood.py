"""Placeholder: the neighborhood method lands with its issue."""
__all__ = []
