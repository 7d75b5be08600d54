"""How far a digit leans: the shear of its stroke, a style an adapter can learn and we can measure.

With ``m`` the foreground mask (1 = stroke), ``x`` the column and ``y`` the row counted
upward, ``(cx, cy)`` the stroke's centroid::

    slant = Σ m (x - cx)(y - cy) / Σ m (y - cy)²

the least-squares slope of x on y weighted by the stroke: 0 for an upright digit, ``s`` for
one sheared by ``x' = x + s (y - cy)`` (``models.data.shear_masks``), so a digit whose top
leans right has a positive slant and its mirror image the negative. Pure numpy.
"""

from __future__ import annotations

import numpy as np

from models.colors import estimate_colors

__all__ = ["mask_slant", "slant"]


def mask_slant(masks: np.ndarray) -> np.ndarray:
    """The slant of each mask (N, H, W) in [0, 1] (1 = foreground): (N,) float64.

    A mask with no foreground, or no vertical extent, has slant 0.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {masks.shape}")
    m = masks.astype(np.float64)
    _, h, w = m.shape
    x = np.arange(w, dtype=np.float64)[None, None, :]
    y = (h - 1 - np.arange(h, dtype=np.float64))[None, :, None]  # rows counted upward
    mass = m.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    cx = (m * x).sum(axis=(1, 2)) / safe
    cy = (m * y).sum(axis=(1, 2)) / safe
    dx = x - cx[:, None, None]
    dy = y - cy[:, None, None]
    cov = (m * dx * dy).sum(axis=(1, 2))
    var = (m * dy * dy).sum(axis=(1, 2))
    return np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)


def slant(images: np.ndarray) -> np.ndarray:
    """The slant of each uint8 RGB image (N, H, W, 3), read from the foreground mask that
    ``models.colors.estimate_colors`` finds: (N,) float64."""
    return mask_slant(estimate_colors(images).masks)
