"""Generate images from an embedded model for a list of targets, one seeded generator per image.

One seed per image (``seed + i``) makes an image independent of how the list is batched, so
the same index gives the same image in a grid, an evaluation or a quantized-vs-FP comparison.
"""

from __future__ import annotations

import numpy as np
import torch

from models.data import COLOR_NAMES, DIGIT_WORDS, Target, caption, draw_colors

__all__ = ["evaluation_targets", "generate", "prompt_for"]


def prompt_for(target: Target) -> str:
    """The text a target is asked with: a caption for text models, the digit word for DiT."""
    if target.fg is None or target.bg is None:
        return DIGIT_WORDS[target.digit]
    return caption(target.digit, target.fg, target.bg)


def evaluation_targets(n: int, *, with_colors: bool, seed: int = 0) -> list[Target]:
    """n targets cycling through the digits; color pairs drawn from a seeded generator."""
    fg, bg = draw_colors(np.random.default_rng(seed), n)
    return [
        Target(i % 10, COLOR_NAMES[fg[i]], COLOR_NAMES[bg[i]]) if with_colors else Target(i % 10)
        for i in range(n)
    ]


@torch.no_grad()
def generate(
    pipe,
    targets: list[Target],
    *,
    seed: int = 0,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 50,
) -> np.ndarray:
    """uint8 images (N, H, W, 3), image i seeded with ``seed + i``."""
    from diffusers import DiTPipeline

    out = []
    for start in range(0, len(targets), batch_size):
        chunk = targets[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        common = {
            "generator": generators,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "output_type": "np",
        }
        if isinstance(pipe, DiTPipeline):
            images = pipe(class_labels=[t.digit for t in chunk], **common).images
        else:
            images = pipe(prompt=[prompt_for(t) for t in chunk], **common).images
        out.append(np.rint(np.asarray(images) * 255).astype(np.uint8))
    return np.concatenate(out)
