"""`visattn-demo --smoke`: start the app on a free local port, drive it through its HTTP API, stop.

The non-interactive check CI runs: it exercises the real server, queue, and the Generate and Pattern
endpoints exactly as a browser or ``gradio_client`` would.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from typing import Any, Optional, Tuple

__all__ = ["free_port", "launch_local", "run_smoke"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(demo, port: Optional[int] = None) -> Tuple[str, int]:
    """Launch ``demo`` on 127.0.0.1 in a background thread; returns (url, port)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    port = port or free_port()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            share=False, css=getattr(demo, "visattn_css", None))
    return url, port


def run_smoke(demo, engine: Any, *, out: str, method: str, size: Optional[int] = None, steps: int = 2) -> int:
    """Generate one image with ``method`` through the HTTP API and write it to ``out``; 0 on success."""
    from gradio_client import Client
    from PIL import Image

    size = size or engine.suggested_size()
    url, _ = launch_local(demo)
    try:
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        image_path, timing, stats = client.predict(prompt="a red star on a blue background", method=method,
                                                   width=size, height=size, steps=steps, seed=0,
                                                   api_name="/generate")
        seconds = time.perf_counter() - t0
        img = Image.open(image_path)
        if img.size != (size, size):
            print(f"visattn-demo --smoke: expected a {size}x{size} image, got {img.size}", file=sys.stderr)
            return 1
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        shutil.copyfile(image_path, out)
        _, pattern_text, _ = client.predict(method=method, api_name="/pattern")
        print(f"visattn-demo --smoke: {url} /generate {method} {size}x{size} in {seconds:.2f} s -> {out}")
        print(f"  {timing}")
        for row in (stats or {}).get("data", []):
            print(f"  layout {dict(zip(stats.get('headers', []), row))}")
        print(f"  /pattern: {pattern_text}")
        return 0
    finally:
        demo.close()
