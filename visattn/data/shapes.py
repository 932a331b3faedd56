"""Deterministic procedural "shapes" images with captions and attribute labels.

    from visattn.data.shapes import make_sample, render, ShapesDataset
    s = make_sample(7)                 # any seed -> the same sample
    s.caption                          # 'a large red star at the top left on a yellow background'
    img = render(s, size=128)          # PIL.Image (RGB)

Every image holds 1-3 objects (shape, colour, size, position on a 3x3 grid) on a plain background
whose colour differs from every object's. The train/validation split is a function of the (unordered)
set of attributes, so no validation combination is ever seen in training.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (130, 40, 170),
    "pink": (245, 135, 195),
    "cyan": (40, 205, 225),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (120, 70, 30),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, float] = {"small": 0.095, "large": 0.155}  # radius as a fraction of the image side
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
# 3x3 grid, row-major; (column, row) of each named position.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
_POSITION_PHRASE = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
N_OBJECTS_P = (0.5, 0.3, 0.2)  # probability of 1, 2, 3 objects


@dataclass(frozen=True)
class ShapeObject:
    """One object: attribute names plus small continuous jitter (fractions of the image side)."""

    shape: str
    color: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def phrase(self, with_size: bool = True, with_position: bool = True, centre_word: str = "centre") -> str:
        """'a large red star at the top left' (size / position optional)."""
        words = ([self.size] if with_size else []) + [self.color, self.shape]
        text = article(words[0]) + " " + " ".join(words)
        if with_position:
            text += " " + _POSITION_PHRASE[self.position].replace("centre", centre_word)
        return text


@dataclass(frozen=True)
class Sample:
    """A full scene description; `render()` draws it at any resolution."""

    seed: int
    objects: tuple[ShapeObject, ...]
    background: str
    caption_options: tuple[bool, bool, bool, str] = field(default=(True, True, True, "centre"))

    @property
    def caption(self) -> str:
        """The full caption with every attribute."""
        return caption(self)

    @property
    def prompt(self) -> str:
        """A caption variant (some attributes dropped) drawn from the seed; used as training text."""
        size, pos, bg, centre = self.caption_options
        return caption(self, with_size=size, with_position=pos, with_background=bg, centre_word=centre)

    def key(self) -> str:
        """Order-independent description of the attribute combination (defines the split)."""
        objs = sorted(f"{o.size} {o.color} {o.shape} {o.position}" for o in self.objects)
        return " | ".join(objs) + " || " + self.background

    @property
    def split(self) -> str:
        """'validation' for about 10% of attribute combinations, else 'train'."""
        return split_of(self)


def caption(sample: Sample, with_size: bool = True, with_position: bool = True, with_background: bool = True,
            centre_word: str = "centre") -> str:
    """'a large red star at the top left and a small blue circle on a yellow background'."""
    text = " and ".join(o.phrase(with_size, with_position, centre_word) for o in sample.objects)
    if with_background:
        text += f" on {article(sample.background)} {sample.background} background"
    return text


def article(word: str) -> str:
    """'a' or 'an' for the following word."""
    return "an" if word[:1] in "aeiou" else "a"


def split_of(sample: Sample) -> str:
    """Deterministic split from an md5 hash of the attribute combination."""
    h = int(hashlib.md5(sample.key().encode()).hexdigest()[:8], 16)
    return "validation" if h % 10 == 0 else "train"


def make_sample(seed: int, n_objects: int | None = None) -> Sample:
    """Draw a scene from `seed` (same seed -> same scene on every platform)."""
    rng = random.Random(int(seed))
    n = n_objects or rng.choices((1, 2, 3), weights=N_OBJECTS_P)[0]
    positions = rng.sample(POSITION_NAMES, n)
    objects = []
    for pos in positions:
        objects.append(ShapeObject(
            shape=rng.choice(SHAPES), color=rng.choice(COLOR_NAMES), size=rng.choice(SIZE_NAMES), position=pos,
            dx=rng.uniform(-0.035, 0.035), dy=rng.uniform(-0.035, 0.035), scale=rng.uniform(0.9, 1.1)))
    used = {o.color for o in objects}
    background = rng.choice([c for c in COLOR_NAMES if c not in used])
    options = (rng.random() > 0.25, rng.random() > 0.25, rng.random() > 0.05, rng.choice(("centre", "center")))
    return Sample(seed=int(seed), objects=tuple(objects), background=background, caption_options=options)


def sample_for_split(index: int, split: str = "train", base_seed: int = 0, n_objects: int | None = None) -> Sample:
    """The `index`-th sample of a split: deterministic rejection over seeds derived from (base_seed, index)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    for j in range(10_000):
        seed = _mix(base_seed, index, j)
        s = make_sample(seed, n_objects)
        if s.split == split:
            return s
    raise RuntimeError("no sample found")  # pragma: no cover (probability ~0)


def _mix(*ints: int) -> int:
    h = hashlib.blake2b(",".join(str(i) for i in ints).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def _polygon_star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * points):
        rad = r if i % 2 == 0 else r * inner
        a = -math.pi / 2 + i * math.pi / points
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def object_box(obj: ShapeObject, size: int) -> tuple[float, float, float]:
    """Centre (x, y) and radius in pixels of an object drawn at `size` px."""
    col, row = POSITIONS[obj.position]
    cx = ((2 * col + 1) / 6 + obj.dx) * size
    cy = ((2 * row + 1) / 6 + obj.dy) * size
    return cx, cy, SIZES[obj.size] * obj.scale * size


def draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, size: int) -> None:
    """Draw one object onto a canvas of side `size`."""
    cx, cy, r = object_box(obj, size)
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * 0.15 + r * math.sin(a))
               for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
        draw.polygon(pts, fill=fill)
    elif obj.shape == "star":
        draw.polygon(_polygon_star(cx, cy, r * 1.1), fill=fill)
    elif obj.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.34 * r)))
    elif obj.shape == "cross":
        t = r * 0.34
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(sample: Sample, size: int = 128, supersample: int = 2) -> Image.Image:
    """Draw `sample` as an RGB image of `size` x `size` px (anti-aliased by supersampling)."""
    big = size * supersample
    img = Image.new("RGB", (big, big), COLORS[sample.background])
    draw = ImageDraw.Draw(img)
    for obj in sample.objects:
        draw_object(draw, obj, big)
    if supersample > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return img


def labels(sample: Sample) -> dict[str, int | list[int]]:
    """Integer labels for classification: first object's attributes, background, counts, presence."""
    o = sample.objects[0]
    present_shapes = [int(any(x.shape == s for x in sample.objects)) for s in SHAPES]
    present_colors = [int(any(x.color == c for x in sample.objects)) for c in COLOR_NAMES]
    return {
        "shape": SHAPES.index(o.shape), "color": COLOR_NAMES.index(o.color), "size": SIZE_NAMES.index(o.size),
        "position": POSITION_NAMES.index(o.position), "background": COLOR_NAMES.index(sample.background),
        "n_objects": len(sample.objects), "shapes_present": present_shapes, "colors_present": present_colors,
    }


def parse_caption(text: str) -> dict[str, str | None]:
    """Best-effort parse of a single-object caption into attribute names (None where absent)."""
    words = text.lower().replace("center", "centre").split()
    out: dict[str, str | None] = {"shape": None, "color": None, "size": None, "position": None, "background": None}
    if "background" in words:
        i = words.index("background")
        if i >= 1 and words[i - 1] in COLORS:
            out["background"] = words[i - 1]
            words = words[: i - 2]
    for w in words:
        if w in SHAPES and out["shape"] is None:
            out["shape"] = w
        elif w in COLORS and out["color"] is None:
            out["color"] = w
        elif w in SIZES and out["size"] is None:
            out["size"] = w
    text_pos = " ".join(words)
    for name, phrase in sorted(_POSITION_PHRASE.items(), key=lambda kv: -len(kv[1])):
        if phrase in text_pos:
            out["position"] = name
            break
    return out


def vocabulary() -> list[str]:
    """Every word that appears in generated captions."""
    words = {"a", "an", "and", "on", "at", "the", "in", "background", "center"}
    words.update(SHAPES, COLOR_NAMES, SIZE_NAMES)
    for phrase in _POSITION_PHRASE.values():
        words.update(phrase.split())
    return sorted(words)


def color_distance(rgb: Sequence[float], name: str) -> float:
    """Euclidean RGB distance from `rgb` (0-255) to a named colour."""
    return math.dist(tuple(float(v) for v in rgb), COLORS[name])


def nearest_color(rgb: Sequence[float]) -> str:
    """The named colour closest to `rgb` (0-255)."""
    return min(COLOR_NAMES, key=lambda n: color_distance(rgb, n))
