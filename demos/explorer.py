"""Pattern explorer: which keys does one query attend under a method? Needs no model.

The picture shows the key grid (one square per token): the chosen query in red, attended keys in blue,
the rest light gray. Keys beyond the grid (other images' tokens, text or register tokens) are drawn as
extra rows of squares below it, grid by grid.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Optional, Tuple

import torch
from PIL import Image, ImageDraw

from visattn.geometry import TokenGeometry
from visattn.methods import AttentionMethod

__all__ = ["explore", "cell_at", "MAX_GRID", "render_pattern"]

MAX_GRID = 96
_QUERY = (220, 40, 40)
_ON = (40, 90, 200)
_OFF = (228, 228, 228)
_UNKNOWN = (250, 200, 90)
_LINE = (255, 255, 255)


def cell_size(grid: Tuple[int, int]) -> int:
    """Pixels per token square so that the picture is about 480 px wide (at least 4 px a square)."""
    return max(4, min(40, 480 // max(grid)))


def cell_at(x: float, y: float, grid: Tuple[int, int]) -> Tuple[int, int]:
    """The (row, col) of the grid square under picture pixel (x, y), clamped to the grid."""
    c = cell_size(grid)
    return (min(max(int(y) // c, 0), grid[0] - 1), min(max(int(x) // c, 0), grid[1] - 1))


def _check_grid(rows: Any, cols: Any) -> Tuple[int, int]:
    for name, v in (("grid rows", rows), ("grid columns", cols)):
        if v is None or float(v) != int(float(v)) or not 1 <= int(float(v)) <= MAX_GRID:
            raise ValueError(f"{name} must be an integer from 1 to {MAX_GRID}, got {v!r}")
    return int(float(rows)), int(float(cols))


def render_pattern(mask: Optional[torch.Tensor], grid: Tuple[int, int], query: Tuple[int, int],
                   kv_len: int) -> Image.Image:
    """Picture of ``mask`` (bool (kv_len,), or None for "depends on the data") over ``grid``."""
    h, w = grid
    n = h * w
    c = cell_size(grid)
    extra = max(0, kv_len - n)
    extra_rows = math.ceil(extra / w) if extra else 0
    gap = c // 2 if extra else 0
    img = Image.new("RGB", (w * c, (h + extra_rows) * c + gap), _LINE)
    draw = ImageDraw.Draw(img)
    m = None if mask is None else mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
    qi = query[0] * w + query[1]
    for idx in range(n + extra):
        if idx < n:
            r, col, y0 = idx // w, idx % w, 0
        else:
            r, col, y0 = (idx - n) // w + h, (idx - n) % w, gap
        color = _UNKNOWN if m is None else (_ON if m[idx] else _OFF)
        if idx == qi:
            color = _QUERY
        x, y = col * c, r * c + y0
        draw.rectangle([x, y, x + c - 2 if c > 4 else x + c - 1, y + c - 2 if c > 4 else y + c - 1], fill=color)
    return img


def explore(method: AttentionMethod, rows: Any, cols: Any, q_row: Any, q_col: Any,
            images: int = 1) -> Tuple[Image.Image, str, Dict[str, Any]]:
    """(picture, one-line summary, layout stats) for query (q_row, q_col) on a rows x cols grid.

    ``images``: how many images share the batch (methods that attend across images, e.g. consistent
    self-attention, show the other images' keys as extra grids).
    """
    h, w = _check_grid(rows, cols)
    for name, v, hi in (("query row", q_row, h), ("query column", q_col, w)):
        if v is None or float(v) != int(float(v)) or not 0 <= int(float(v)) < hi:
            raise ValueError(f"{name} must be an integer from 0 to {hi - 1}, got {v!r}")
    if images is None or float(images) != int(float(images)) or not 1 <= int(float(images)) <= 8:
        raise ValueError(f"images must be an integer from 1 to 8, got {images!r}")
    qr, qc, images = int(float(q_row)), int(float(q_col)), int(float(images))
    n = h * w
    geom = TokenGeometry(batch=images, heads=1, seq_len=n, kv_len=n, grid=(h, w))
    qi = qr * w + qc
    mask = method.pattern(geom, qi)
    sampled = False
    if mask is None and {"q", "k"} <= set(inspect.signature(method.pattern).parameters):
        # data-dependent (e.g. routed regions): show one sample on seeded random queries and keys
        g = torch.Generator().manual_seed(0)
        q = torch.randn(images, 1, n, 16, generator=g)
        k = torch.randn(images, 1, n, 16, generator=g)
        mask = method.pattern(geom, qi, q=q, k=k)
        sampled = mask is not None
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 1
                             or mask.numel() < n):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"method {method.name!r}: pattern() returned {got}; expected a bool vector of at "
                         f"least {n} keys (kv_len,)")
    kv_len = n if mask is None else int(mask.numel())
    try:
        stats = method.layout_stats(geom) or {}
    except Exception as e:  # noqa: BLE001 - stats are informative only
        stats = {"error": f"{type(e).__name__}: {e}"}
    img = render_pattern(mask, (h, w), (qr, qc), kv_len)
    if mask is None:
        text = (f"{method.name}: the keys of query ({qr}, {qc}) depend on the data (computed at run time), "
                f"so they are shown as unknown")
    else:
        on = int(mask.sum())
        text = (f"{method.name}: query ({qr}, {qc}) attends {on} of {kv_len} keys "
                f"({100.0 * on / max(kv_len, 1):.1f}%) on a {h}x{w} grid")
        if sampled:
            text += " (data-dependent: shown for seeded random queries/keys)"
    return img, text, dict(stats)


def blank_grid(rows: int, cols: int) -> Image.Image:
    """An empty grid picture (before the first click)."""
    return render_pattern(torch.zeros(rows * cols, dtype=torch.bool), (rows, cols), (-1, -1), rows * cols)

