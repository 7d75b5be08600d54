"""Which two palette colors an image is painted in, and where its foreground is.

Every image of the data set is ``m * fg + (1 - m) * bg``. For each pair of palette colors we
project the pixels on the segment bg -> fg and keep the pair that explains the image best; the
background is the color that fills the left and right margins, where digits rarely reach.
Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from models.data import PALETTE

__all__ = ["ColorEstimate", "estimate_colors"]

MARGIN = 3  # columns on each side that decide which color is the background


@dataclass(frozen=True)
class ColorEstimate:
    fg: np.ndarray  # (N,) palette indices
    bg: np.ndarray
    masks: np.ndarray  # (N, H, W) float32 in [0, 1], 1 = foreground
    residual: np.ndarray  # (N,) mean squared error of the two-color model, in [0, 1]^2 units


def _project(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask m (N, H, W) placing each pixel between color a (m=0) and b (m=1), and its residual."""
    d = b - a
    m = np.clip(((x - a) @ d) / (d @ d), 0.0, 1.0)
    err = ((x - (a + m[..., None] * d)) ** 2).mean(axis=(1, 2, 3))
    return m.astype(np.float32), err


def estimate_colors(images: np.ndarray) -> ColorEstimate:
    """uint8 images (N, H, W, 3) -> estimated fg / bg palette indices and foreground masks."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB images, got shape {images.shape}")
    x = images.astype(np.float32) / 255.0
    colors = np.asarray(list(PALETTE.values()), np.float32) / 255.0
    pairs = list(combinations(range(len(colors)), 2))
    masks, errs = zip(*(_project(x, colors[a], colors[b]) for a, b in pairs), strict=True)
    best = np.argmin(np.stack(errs), axis=0)
    n = len(images)
    a = np.array([pairs[k][0] for k in best])
    b = np.array([pairs[k][1] for k in best])
    m = np.stack(masks)[best, np.arange(n)]  # m = 1 at color b
    margins = np.concatenate([m[:, :, :MARGIN], m[:, :, -MARGIN:]], axis=2).mean(axis=(1, 2))
    b_is_bg = margins > 0.5
    fg = np.where(b_is_bg, a, b)
    bg = np.where(b_is_bg, b, a)
    masks_fg = np.where(b_is_bg[:, None, None], 1.0 - m, m).astype(np.float32)
    return ColorEstimate(fg, bg, masks_fg, np.stack(errs)[best, np.arange(n)])
