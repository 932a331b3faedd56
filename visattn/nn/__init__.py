"""`torch.nn` modules with their own projections, for people building models."""
__all__: list = []
for _name in ("neighborhood", "routing", "agent"):
    try:
        _mod = __import__(f"{__name__}.{_name}", fromlist=["__all__"])
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_name}":
            raise
        continue
    for _n in getattr(_mod, "__all__", []):
        globals()[_n] = getattr(_mod, _n)
        __all__.append(_n)
