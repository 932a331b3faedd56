"""Procedural datasets (no downloads): :mod:`visattn.data.shapes`."""
from .dataset import ShapesDataset, render_batch
from .shapes import (COLOR_NAMES, COLORS, POSITION_NAMES, SHAPES, SIZE_NAMES, Sample, ShapeObject, caption, labels,
                     make_sample, nearest_color, parse_caption, render, sample_for_split, split_of, vocabulary)

__all__ = ["ShapesDataset", "render_batch", "Sample", "ShapeObject", "SHAPES", "COLORS", "COLOR_NAMES",
           "SIZE_NAMES", "POSITION_NAMES", "make_sample", "render", "labels", "caption", "split_of",
           "sample_for_split", "parse_caption", "vocabulary", "nearest_color"]
