import math

import numpy as np
import pytest
import torch

from quality.metrics import frechet_distance, psnr_db, sqnr_db, ssim


def test_sqnr_of_a_known_noise_level():
    y = np.ones(1000)
    assert sqnr_db(y, y + 0.1) == pytest.approx(20.0)  # power 1 vs noise 0.01
    assert sqnr_db(torch.ones(10), torch.ones(10)) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(np.ones(3), np.ones(4))


def test_psnr_and_ssim_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b[..., 0] = np.clip(b[..., 0].astype(int) + 10, 0, 255)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr_db(a, b) == pytest.approx(10 * np.log10(255**2 / mse))
    assert psnr_db(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) < 1.0
    with pytest.raises(ValueError, match="uint8"):
        psnr_db(a.astype(float), b.astype(float))


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(x, x + 1.0) == pytest.approx(8.0, rel=1e-3)  # |mu shift|^2 = 8
