"""Method configs. Each module registers its methods with `register_method` on import."""
from .base import AttentionMethod, get_method, list_methods, method_options, register_method
from .dense import Dense
from .neighborhood import *  # noqa: F401,F403
from .routing import *  # noqa: F401,F403
from .consistent import *  # noqa: F401,F403
from .agent import *  # noqa: F401,F403
from . import neighborhood as _na, routing as _ra, consistent as _cs, agent as _ag

__all__ = ["AttentionMethod", "get_method", "list_methods", "method_options", "register_method", "Dense"]
for _m in (_na, _ra, _cs, _ag):
    __all__ += list(getattr(_m, "__all__", []))
