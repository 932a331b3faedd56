"""visattn: vision attention methods for diffusers, timm and transformers models.

    import visattn
    handle = visattn.apply(pipe, visattn.methods.Neighborhood(kernel_size=7))
    ...
    handle.remove()            # or: with visattn.apply(...): ...
"""
from . import kernels  # noqa: F401  (visattn.kernels)
from .geometry import TokenGeometry
from .methods import AttentionMethod, get_method, list_methods, register_method
from . import methods, functional, nn  # noqa: F401
from .api import Handle, apply, remove

__version__ = "0.1.0"
__all__ = ["apply", "remove", "Handle", "TokenGeometry", "AttentionMethod", "register_method", "list_methods",
           "get_method", "methods", "functional", "nn", "kernels", "__version__"]
