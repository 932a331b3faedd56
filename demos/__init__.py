"""`visattn.demos`: the Gradio web demo (`visattn-demo`, `python -m visattn.demos`)."""
from __future__ import annotations

__all__ = ["build_app", "main"]


def build_app(*args, **kwargs):
    """Build the Gradio app (see :func:`visattn.demos.app.build_app`); imports gradio on first use."""
    from .app import build_app as _build
    return _build(*args, **kwargs)


def main(argv=None) -> int:
    """Run ``visattn-demo`` (see :func:`visattn.demos.app.main`)."""
    from .app import main as _main
    return _main(argv)
