"""Run a pipeline for a list of conditions, one seeded generator per image.

A condition is a class id (DiT-style pipelines) or a prompt (text-to-image pipelines). One seed
per image (``seed + i``) makes an image independent of how the list is batched, so the same
index gives the same image in a grid, an evaluation or a quantized-vs-FP comparison. The final
latents (what the VAE decodes) come back too, for SQNR on latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.data import COLOR_NAMES, DIGIT_WORDS, Target, caption, draw_colors

__all__ = ["Samples", "conditions_for", "evaluation_targets", "generate", "prompt_for", "sample"]


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # uint8 (N, H, W, 3)
    latents: torch.Tensor  # (N, C, h, w), as given to the VAE decoder


def prompt_for(target: Target) -> str:
    """The text a target is asked with: a caption, or the digit word when no colors are set."""
    if target.fg is None or target.bg is None:
        return DIGIT_WORDS[target.digit]
    return caption(target.digit, target.fg, target.bg)


def conditions_for(pipe, targets: list[Target]) -> list[int] | list[str]:
    """Class ids for a class-conditional pipeline, prompts for a text-to-image one."""
    from diffusers import DiTPipeline

    if isinstance(pipe, DiTPipeline):
        return [t.digit for t in targets]
    return [prompt_for(t) for t in targets]


def evaluation_targets(n: int, *, with_colors: bool, seed: int = 0) -> list[Target]:
    """n targets cycling through the digits; color pairs drawn from a seeded generator."""
    fg, bg = draw_colors(np.random.default_rng(seed), n)
    return [
        Target(i % 10, COLOR_NAMES[fg[i]], COLOR_NAMES[bg[i]]) if with_colors else Target(i % 10)
        for i in range(n)
    ]


@torch.no_grad()
def sample(
    pipe,
    conditions: list[int] | list[str],
    *,
    seed: int = 0,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 50,
) -> Samples:
    """Images and final latents for each condition, image i seeded with ``seed + i``."""
    from diffusers import DiTPipeline

    images, latents = [], []
    decode = pipe.vae.decode

    def capturing_decode(z, *args, **kwargs):
        latents.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode = capturing_decode
    try:
        for start in range(0, len(conditions), batch_size):
            chunk = conditions[start : start + batch_size]
            common = {
                "generator": [
                    torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))
                ],
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "output_type": "np",
            }
            if isinstance(pipe, DiTPipeline):
                out = pipe(class_labels=list(chunk), **common)
            else:
                out = pipe(prompt=list(chunk), **common)
            images.append(np.rint(np.asarray(out.images) * 255).astype(np.uint8))
    finally:
        del pipe.vae.decode  # back to the class method
    return Samples(np.concatenate(images), torch.cat(latents))


def generate(pipe, targets: list[Target], **kwargs) -> np.ndarray:
    """uint8 images for digit targets; see ``sample`` for the arguments."""
    return sample(pipe, conditions_for(pipe, targets), **kwargs).images
