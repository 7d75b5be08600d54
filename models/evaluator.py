"""Score generated images: does each show the digit (and colors) asked for; how real do they look.

evaluator = Evaluator.load()
report = evaluator.prompt_accuracy(images, targets)   # share right, digit and colors
fd = evaluator.fd(images, data.load("heldout").images)
lean = evaluator.slant(images).mean()                 # the italic style's effect (models.slant)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.classifier import load_classifier
from models.colors import estimate_colors
from models.data import COLOR_NAMES, Target
from models.slant import slant
from quality.metrics import frechet_distance

__all__ = ["CLASSIFIER_DIR", "Accuracy", "Evaluator"]

CLASSIFIER_DIR = Path(__file__).resolve().parent / "digit-classifier"


@dataclass(frozen=True)
class Accuracy:
    prompt_accuracy: float  # digit right, and both colors right where the target names them
    digit_accuracy: float
    color_accuracy: float | None  # None when no target names a color
    correct: np.ndarray  # (N,) bool


@dataclass(frozen=True)
class Reading:
    digits: np.ndarray  # (N,) predicted digit
    fg: np.ndarray  # (N,) palette index
    bg: np.ndarray
    features: np.ndarray  # (N, FEATURE_DIM) classifier features


class Evaluator:
    def __init__(self, classifier: torch.nn.Module) -> None:
        self.classifier = classifier

    @classmethod
    def load(cls, folder: Path = CLASSIFIER_DIR) -> Evaluator:
        return cls(load_classifier(folder))

    @torch.no_grad()
    def read(self, images: np.ndarray, batch_size: int = 512) -> Reading:
        """Classify uint8 RGB images (N, 32, 32, 3): digit, colors and features."""
        colors = estimate_colors(images)
        logits, feats = [], []
        for i in range(0, len(images), batch_size):
            lg, ft = self.classifier(torch.from_numpy(colors.masks[i : i + batch_size]))
            logits.append(lg)
            feats.append(ft)
        return Reading(
            torch.cat(logits).argmax(1).numpy(), colors.fg, colors.bg, torch.cat(feats).numpy()
        )

    def prompt_accuracy(self, images: np.ndarray, targets: list[Target]) -> Accuracy:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images for {len(targets)} targets")
        reading = self.read(images)
        digit_ok = reading.digits == np.array([t.digit for t in targets])
        color_ok = np.ones(len(targets), bool)
        asked_color = np.array([t.fg is not None or t.bg is not None for t in targets])
        for i, t in enumerate(targets):
            if t.fg is not None:
                color_ok[i] &= COLOR_NAMES[reading.fg[i]] == t.fg
            if t.bg is not None:
                color_ok[i] &= COLOR_NAMES[reading.bg[i]] == t.bg
        correct = digit_ok & color_ok
        return Accuracy(
            prompt_accuracy=float(correct.mean()),
            digit_accuracy=float(digit_ok.mean()),
            color_accuracy=float(color_ok[asked_color].mean()) if asked_color.any() else None,
            correct=correct,
        )

    def slant(self, images: np.ndarray) -> np.ndarray:
        """The slant of each image's stroke (N,): 0 upright, > 0 its top leaning right
        (``models.slant``); needs no classifier."""
        return slant(images)

    def fd(self, images: np.ndarray, reference_images: np.ndarray) -> float:
        """Fréchet distance of classifier features, generated vs reference (e.g. held-out real)."""
        return frechet_distance(self.read(images).features, self.read(reference_images).features)
