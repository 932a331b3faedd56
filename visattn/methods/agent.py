"""Placeholder: the agent method lands with its issue."""
__all__ = []
