"""A small CNN that reads the attributes of single-object shapes images (evaluation of generated images)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visattn.data.shapes import COLOR_NAMES, POSITION_NAMES, SHAPES, SIZE_NAMES

HEADS: dict[str, int] = {"shape": len(SHAPES), "color": len(COLOR_NAMES), "size": len(SIZE_NAMES),
                         "position": len(POSITION_NAMES), "background": len(COLOR_NAMES)}
NAMES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZE_NAMES,
                                     "position": POSITION_NAMES, "background": COLOR_NAMES}


class ShapesClassifier(nn.Module):
    """Conv net on 128 px RGB in [0, 1] -> logits per attribute head (see HEADS)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        chans = [3, w, 2 * w, 4 * w, 4 * w]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers)          # 128 -> 8
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, n) for k, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != 128 or images.shape[-2] != 128:
            images = F.interpolate(images, size=(128, 128), mode="area")
        h = self.fc(self.pool(self.features(images * 2 - 1)))
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Attribute names predicted for a batch of images (B, 3, H, W) in [0, 1]."""
        out = self(images)
        return {k: [NAMES[k][i] for i in v.argmax(-1).tolist()] for k, v in out.items()}


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesClassifier:
    """Load the shipped (or a given) classifier checkpoint (safetensors)."""
    from safetensors.torch import load_file

    from .default_model import CLASSIFIER_PATH

    model = ShapesClassifier()
    state = load_file(str(path or CLASSIFIER_PATH))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()
