import numpy as np
import pytest

from models import data


def test_split_is_deterministic_disjoint_and_stratified():
    train, heldout = data._split_indices()
    data._split_indices.cache_clear()
    again_train, again_heldout = data._split_indices()
    assert np.array_equal(train, again_train) and np.array_equal(heldout, again_heldout)
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == 1797
    assert len(heldout) == 360
    assert np.bincount(data.load("heldout").digits).min() >= 35


def test_images_colors_and_captions_are_rebuilt_identically():
    first = data.load("train")
    data.load.cache_clear()
    second = data.load("train")
    assert first is not second
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.fg, second.fg) and np.array_equal(first.bg, second.bg)
    assert first.captions == second.captions


def test_images_are_32x32_rgb_painted_in_two_different_palette_colors():
    split = data.load("heldout")
    assert split.images.shape == (360, 32, 32, 3) and split.images.dtype == np.uint8
    assert (split.fg != split.bg).all()
    assert set(split.fg) | set(split.bg) == set(range(len(data.PALETTE)))
    # a pixel at mask 1 is the foreground color, at mask 0 the background color
    i = 0
    m = split.masks[i]
    fg = np.array(data.PALETTE[data.COLOR_NAMES[split.fg[i]]])
    bg = np.array(data.PALETTE[data.COLOR_NAMES[split.bg[i]]])
    assert (split.images[i][m == 1.0] == fg).all()
    assert (split.images[i][m == 0.0] == bg).all()


def test_every_caption_parses_back_to_its_labels():
    split = data.load("train")
    for text, target in zip(split.captions, split.targets(), strict=True):
        assert data.parse_prompt(text) == target


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("seven", data.Target(7)),
        ("7", data.Target(7)),
        ("A Red Seven on a Black background", data.Target(7, "red", "black")),
        ("the digit 3 in yellow", data.Target(3, "yellow", None)),
    ],
)
def test_parse_prompt(prompt, expected):
    assert data.parse_prompt(prompt) == expected


def test_parse_prompt_without_a_digit_is_an_error():
    with pytest.raises(ValueError, match="names no digit"):
        data.parse_prompt("a red cat on a black background")
