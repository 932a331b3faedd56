"""Torch datasets over the procedural shapes generator."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .shapes import Sample, labels, render, sample_for_split


class ShapesDataset(Dataset):
    """`length` deterministic samples of one split, rendered at `size` px.

    Items are dicts: ``image`` (3, size, size) float in [0, 1] (or [-1, 1] with ``normalize=True``),
    ``caption`` (full), ``prompt`` (training variant, some attributes dropped), and integer ``labels``
    (see :func:`visattn.data.shapes.labels`) as tensors.
    """

    def __init__(self, split: str = "train", length: int = 10_000, size: int = 128, base_seed: int = 0,
                 n_objects: int | None = None, normalize: bool = False) -> None:
        self.split, self.length, self.size = split, int(length), int(size)
        self.base_seed, self.n_objects, self.normalize = base_seed, n_objects, normalize

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Sample:
        """The scene description of item `index`."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        return sample_for_split(index, self.split, self.base_seed, self.n_objects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.sample(index)
        arr = np.asarray(render(s, self.size), dtype=np.float32) / 255.0
        img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.normalize:
            img = img * 2 - 1
        lab = {k: torch.tensor(v) for k, v in labels(s).items()}
        return {"image": img, "caption": s.caption, "prompt": s.prompt, "labels": lab}


def render_batch(samples: list[Sample], size: int) -> np.ndarray:
    """Render samples into one uint8 array (N, size, size, 3)."""
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, s in enumerate(samples):
        out[i] = np.asarray(render(s, size))
    return out
