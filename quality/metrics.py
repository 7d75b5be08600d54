"""Fidelity and distribution metrics: SQNR on tensors, PSNR / SSIM on images, Fréchet distance.

PSNR and SSIM come from scikit-image. Pure computation, no I/O.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["frechet_distance", "psnr_db", "sqnr_db", "ssim"]


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum y^2 / sum (y - y_q)^2)`` over the batch.

    Accepts numpy arrays or torch tensors; ``inf`` when the two are identical.
    """
    y = np.asarray(_to_numpy(reference), np.float64)
    yq = np.asarray(_to_numpy(test), np.float64)
    if y.shape != yq.shape:
        raise ValueError(f"shapes differ: {y.shape} vs {yq.shape}")
    noise = np.sum((y - yq) ** 2)
    if noise == 0:
        return float("inf")
    return float(10.0 * np.log10(np.sum(y**2) / noise))


def psnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of uint8 images (N, H, W, 3) over the whole batch; ``inf`` when identical."""
    _check_images(reference, test)
    if np.array_equal(reference, test):
        return float("inf")
    return float(peak_signal_noise_ratio(reference, test, data_range=255))


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean SSIM of uint8 images (N, H, W, 3), per image then averaged."""
    _check_images(reference, test)
    scores = [
        structural_similarity(r, t, data_range=255, channel_axis=-1, win_size=7)
        for r, t in zip(reference, test, strict=True)
    ]
    return float(np.mean(scores))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) - the FID formula."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.cov(features_a, rowvar=False)
    cov_b = np.cov(features_b, rowvar=False)
    # A small ridge keeps the square root defined when features have no variance (dead units).
    eps = 1e-6 * np.eye(len(cov_a))
    covmean = np.real(linalg.sqrtm((cov_a + eps) @ (cov_b + eps)))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def _check_images(reference: np.ndarray, test: np.ndarray) -> None:
    if reference.shape != test.shape:
        raise ValueError(f"image shapes differ: {reference.shape} vs {test.shape}")
    if reference.dtype != np.uint8 or test.dtype != np.uint8:
        raise ValueError("PSNR / SSIM expect uint8 images")


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x
