"""The slant measure (models.slant) and the shear that makes italic digits (data.shear_masks)."""

import numpy as np
import pytest

from models import data
from models.evaluator import Evaluator
from models.slant import mask_slant, slant


def bar(shear: float = 0.0, size: int = 32) -> np.ndarray:
    """A vertical bar 3 px wide, rows 4..27, its centre column moved by ``shear`` per row
    above the middle (rows counted upward), antialiased by the coverage of each pixel."""
    mask = np.zeros((size, size), np.float32)
    rows = np.arange(4, 28)
    yup = size - 1 - rows
    centre = size / 2 + shear * (yup - yup.mean())
    cols = np.arange(size)
    for r, c in zip(rows, centre, strict=True):
        # the part of [c - 1.5, c + 1.5] inside each pixel [col - 0.5, col + 0.5]
        mask[r] = np.clip(np.minimum(cols + 0.5, c + 1.5) - np.maximum(cols - 0.5, c - 1.5), 0, 1)
    return mask[None]


def test_an_upright_bar_has_no_slant():
    assert abs(mask_slant(bar())[0]) < 1e-9


@pytest.mark.parametrize("s", [0.2, 0.45, -0.3])
def test_a_sheared_bar_has_its_shear_as_slant_and_its_mirror_the_negative(s):
    sheared = bar(s)
    assert mask_slant(sheared)[0] == pytest.approx(s, abs=0.01)
    assert mask_slant(sheared[:, :, ::-1])[0] == pytest.approx(-s, abs=0.01)


def test_shear_masks_of_an_upright_bar_gives_the_sheared_bar():
    got = data.shear_masks(bar(), 0.3)
    assert mask_slant(got)[0] == pytest.approx(0.3, abs=0.01)
    assert got.dtype == np.float32 and got.shape == (1, 32, 32)
    assert got.sum() == pytest.approx(bar().sum(), rel=1e-3)  # nothing left the frame
    assert np.array_equal(data.shear_masks(bar(), 0.0), bar())


def test_an_empty_mask_has_slant_zero():
    assert mask_slant(np.zeros((2, 32, 32), np.float32)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("s", [0.2, 0.4])
def test_data_set_digits_sheared_by_s_lean_by_about_s_more(s):
    heldout = data.load("heldout")
    sheared = data.colorize(data.shear_masks(heldout.masks, s), heldout.fg, heldout.bg)
    shift = slant(sheared) - slant(heldout.images)
    assert shift.mean() == pytest.approx(s, abs=0.03)
    mirrored = slant(heldout.images[:, :, ::-1]).mean()
    assert mirrored == pytest.approx(-slant(heldout.images).mean(), abs=1e-9)


def test_evaluator_slant_is_per_image():
    heldout = data.load("heldout")
    lean = Evaluator(classifier=None).slant(heldout.images[:8])
    assert lean.shape == (8,)
    assert np.allclose(lean, slant(heldout.images[:8]))
