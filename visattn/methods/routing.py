"""Placeholder: the routing method lands with its issue."""
__all__ = []
