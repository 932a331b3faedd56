"""Placeholder: the consistent method lands with its issue."""
__all__ = []
