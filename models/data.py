"""The "colored digits" data set, built from scikit-learn's bundled 8x8 digits (nothing downloaded).

Each 8x8 digit is upsampled to a 32x32 intensity mask ``m`` in [0, 1]; the RGB image is
``m * fg + (1 - m) * bg`` with two different colors from ``PALETTE``. Colors per image and the
train / held-out split are fixed by seeds, so the data set is the same on every machine.
Pure numpy: no torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

__all__ = [
    "COLOR_NAMES",
    "DIGIT_WORDS",
    "IMAGE_SIZE",
    "PALETTE",
    "TEMPLATES",
    "ColoredDigits",
    "Target",
    "caption",
    "colorize",
    "load",
    "parse_prompt",
    "shear_masks",
]

IMAGE_SIZE = 32
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 30),
}
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a {fg} {word} on a {bg} background",
    "the digit {digit} in {fg} on {bg}",
    "a {fg} digit {word} on {bg}",
    "{word} written in {fg} on a {bg} background",
)
SPLIT_SEED = 0
COLOR_SEED = 1
HELDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Target:
    """What a prompt asks for; a color of ``None`` means "not asked" (class-conditional models)."""

    digit: int
    fg: str | None = None
    bg: str | None = None


@dataclass(frozen=True)
class ColoredDigits:
    """One split: masks (N, 32, 32) float32 in [0, 1], images (N, 32, 32, 3) uint8, and labels."""

    masks: np.ndarray
    images: np.ndarray
    digits: np.ndarray
    fg: np.ndarray  # palette indices
    bg: np.ndarray
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.digits)

    def targets(self) -> list[Target]:
        return [
            Target(int(d), COLOR_NAMES[f], COLOR_NAMES[b])
            for d, f, b in zip(self.digits, self.fg, self.bg, strict=True)
        ]


def upsample_masks(digits8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) intensities 0..16 -> (N, 32, 32) float32 masks in [0, 1] (bilinear)."""
    out = np.empty((len(digits8), IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for i, d in enumerate(digits8):
        img = Image.fromarray((d / 16.0).astype(np.float32), mode="F")
        out[i] = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def shear_masks(masks: np.ndarray, s: float) -> np.ndarray:
    """Masks (N, H, W) sheared horizontally: the stroke at height ``y`` (rows counted upward)
    moves by ``s (y - cy)``, ``cy`` the height of each mask's centroid, so ``s > 0`` leans its
    top to the right and the centroid stays where it was. Linear interpolation along each row
    (the shear moves pixels along rows only, so this is the bilinear resampling); what comes
    in from outside the frame is 0. The same dtype and shape back."""
    if masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {masks.shape}")
    n, h, w = masks.shape
    m = masks.astype(np.float64)
    y = (h - 1 - np.arange(h, dtype=np.float64))[None, :]  # (1, H), upward
    mass = m.sum(axis=(1, 2))
    cy = np.where(mass > 0, (m.sum(axis=2) * y).sum(axis=1) / np.where(mass > 0, mass, 1), 0)
    cy = np.where(mass > 0, cy, (h - 1) / 2)
    shift = s * (y - cy[:, None])  # (N, H): how far each row moves right
    src = np.arange(w, dtype=np.float64)[None, None, :] - shift[:, :, None]  # (N, H, W)
    left = np.floor(src).astype(np.int64)
    frac = src - left
    padded = np.pad(m, ((0, 0), (0, 0), (1, 1)))  # a zero column each side, index + 1
    rows = np.arange(n)[:, None, None], np.arange(h)[None, :, None]
    a = padded[(*rows, np.clip(left + 1, 0, w + 1))]
    b = padded[(*rows, np.clip(left + 2, 0, w + 1))]
    out = (1 - frac) * a + frac * b
    return out.astype(masks.dtype)


def colorize(masks: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Masks (N, H, W) and palette indices (N,) -> uint8 RGB images (N, H, W, 3)."""
    colors = np.asarray(list(PALETTE.values()), np.float32)
    m = masks[..., None]
    rgb = m * colors[fg][:, None, None, :] + (1.0 - m) * colors[bg][:, None, None, :]
    return np.rint(rgb).astype(np.uint8)


def draw_colors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n (fg, bg) palette index pairs, never the same color twice."""
    fg = rng.integers(0, len(PALETTE), n)
    bg = (fg + rng.integers(1, len(PALETTE), n)) % len(PALETTE)
    return fg, bg


def caption(digit: int, fg: str, bg: str, template: int = 0) -> str:
    return TEMPLATES[template].format(word=DIGIT_WORDS[digit], digit=digit, fg=fg, bg=bg)


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    idx = np.arange(len(labels))
    train, heldout = train_test_split(
        idx, test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return np.sort(train), np.sort(heldout)


@lru_cache(maxsize=2)
def load(split: str = "train") -> ColoredDigits:
    """The deterministic ``"train"`` or ``"heldout"`` split of the colored digits."""
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    raw = load_digits()
    rng = np.random.default_rng(COLOR_SEED)
    fg_all, bg_all = draw_colors(rng, len(raw.target))
    template_all = rng.integers(0, len(TEMPLATES), len(raw.target))
    idx = _split_indices()[0 if split == "train" else 1]
    masks = upsample_masks(raw.images[idx])
    digits, fg, bg = raw.target[idx], fg_all[idx], bg_all[idx]
    captions = tuple(
        caption(int(d), COLOR_NAMES[f], COLOR_NAMES[b], int(t))
        for d, f, b, t in zip(digits, fg, bg, template_all[idx], strict=True)
    )
    return ColoredDigits(masks, colorize(masks, fg, bg), digits, fg, bg, captions)


_DIGIT_PATTERN = "|".join([*DIGIT_WORDS, *map(str, range(10))])
_COLOR_PATTERN = "|".join(COLOR_NAMES)


def parse_prompt(prompt: str) -> Target:
    """Read the digit and, when present, the colors a prompt asks for.

    The digit is a word ("seven") or a numeral ("7"); the first color named is the foreground,
    a color after "on" the background. Raises ``ValueError`` when no digit is named.
    """
    text = prompt.lower()
    digit = re.search(rf"\b({_DIGIT_PATTERN})\b", text)
    if digit is None:
        raise ValueError(f"the prompt names no digit: {prompt!r}")
    word = digit.group(1)
    value = int(word) if word.isdigit() else DIGIT_WORDS.index(word)
    bg = re.search(rf"\bon (?:an? )?({_COLOR_PATTERN})\b", text)
    fg = re.search(rf"\b({_COLOR_PATTERN})\b", text[: bg.start()] if bg else text)
    return Target(value, fg.group(1) if fg else None, bg.group(1) if bg else None)


def digit_id2label() -> dict[str, str]:
    """Class id -> comma-separated names, the format DiTPipeline reads ("7" -> "seven, 7")."""
    return {str(i): f"{word}, {i}" for i, word in enumerate(DIGIT_WORDS)}
