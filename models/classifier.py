"""The digit classifier behind ``prompt_accuracy`` and ``fd``: a small CNN on 32x32 digit masks.

It sees only the mask (where the foreground is), never the colors, so the same network scores
class-conditional and text-conditioned images; the colors are checked apart (``models.colors``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["FEATURE_DIM", "DigitClassifier", "load_classifier", "save_classifier"]

FEATURE_DIM = 64
WEIGHTS = "model.safetensors"


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (N, 32, 32) in [0, 1] -> (logits (N, 10), features (N, FEATURE_DIM))."""
        feats = self.features(self.conv(masks[:, None] * 2.0 - 1.0))
        return self.head(feats), feats


def save_classifier(model: DigitClassifier, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))


def load_classifier(folder: Path) -> DigitClassifier:
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m models.train digit-classifier`")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
