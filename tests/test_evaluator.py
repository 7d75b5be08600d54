import numpy as np
import pytest

from models import data
from models.colors import estimate_colors
from models.evaluator import Evaluator


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.load()


def test_held_out_real_digits_score_at_least_97_percent(evaluator):
    heldout = data.load("heldout")
    accuracy = evaluator.prompt_accuracy(heldout.images, heldout.targets())
    assert accuracy.digit_accuracy >= 0.97
    assert accuracy.color_accuracy == 1.0
    assert accuracy.prompt_accuracy >= 0.97


def test_pure_noise_scores_near_chance(evaluator):
    heldout = data.load("heldout")
    noise = np.random.default_rng(0).integers(0, 256, heldout.images.shape, dtype=np.uint8)
    accuracy = evaluator.prompt_accuracy(noise, heldout.targets())
    assert accuracy.digit_accuracy < 0.2  # chance is 0.1
    assert accuracy.prompt_accuracy < 0.05  # chance is 0.1 / 30 color pairs


def test_a_wrong_digit_or_color_is_counted_wrong(evaluator):
    heldout = data.load("heldout")
    targets = heldout.targets()
    wrong_digit = [data.Target((t.digit + 1) % 10, t.fg, t.bg) for t in targets]
    swapped = [data.Target(t.digit, t.bg, t.fg) for t in targets]
    assert evaluator.prompt_accuracy(heldout.images, wrong_digit).prompt_accuracy < 0.05
    assert evaluator.prompt_accuracy(heldout.images, swapped).prompt_accuracy == 0.0
    digit_only = [data.Target(t.digit) for t in targets]
    assert evaluator.prompt_accuracy(heldout.images, digit_only).color_accuracy is None


def test_color_estimate_recovers_masks_of_real_images():
    heldout = data.load("heldout")
    estimate = estimate_colors(heldout.images)
    assert (estimate.fg == heldout.fg).all() and (estimate.bg == heldout.bg).all()
    assert np.abs(estimate.masks - heldout.masks).max() < 0.02


def test_fd_of_real_halves_is_far_below_fd_of_noise(evaluator):
    images = data.load("heldout").images
    noise = np.random.default_rng(1).integers(0, 256, images.shape, dtype=np.uint8)
    real = evaluator.fd(images[::2], images[1::2])
    assert real * 5 < evaluator.fd(noise, images)
