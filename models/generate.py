"""Run a pipeline for a list of conditions, one seeded generator per image.

A condition is a class id (DiT-style pipelines) or a prompt (text-to-image pipelines). One seed
per image (``seed + i``) makes an image independent of how the list is batched, so the same
index gives the same image in a grid, an evaluation or a quantized-vs-FP comparison. The final
latents (what the VAE decodes) come back too, for SQNR on latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.data import COLOR_NAMES, DIGIT_WORDS, Target, caption, draw_colors

__all__ = [
    "Samples",
    "conditions_for",
    "evaluation_targets",
    "generate",
    "prompt_for",
    "run",
    "sample",
]


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
    parts = [
        run(
            pipe,
            conditions[start : start + batch_size],
            [seed + start + i for i in range(len(conditions[start : start + batch_size]))],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        for start in range(0, len(conditions), batch_size)
    ]
    return Samples(np.concatenate([p.images for p in parts]), torch.cat([p.latents for p in parts]))


@torch.no_grad()
def run(
    pipe,
    conditions: list[int] | list[str],
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Samples:
    """One pipeline call: image i from ``conditions[i]`` with noise from ``seeds[i]``.

    ``on_step(step, steps)`` is called after every denoising step (through the scheduler, so
    it works for every pipeline, DiT's included, which has no step callback); an exception it
    raises stops the call.
    """
    from diffusers import DiTPipeline

    if len(conditions) != len(seeds):
        raise ValueError("one seed per condition")
    latents: list[torch.Tensor] = []
    decode, step = pipe.vae.decode, pipe.scheduler.step
    done = 0

    def capturing_decode(z, *args, **kwargs):
        latents.append(z.detach().float().cpu().clone())
        return decode(z, *args, **kwargs)

    def counting_step(*args, **kwargs):
        nonlocal done
        out = step(*args, **kwargs)
        done += 1
        if on_step is not None:
            on_step(min(done, num_inference_steps), num_inference_steps)
        return out

    pipe.vae.decode = capturing_decode
    pipe.scheduler.step = counting_step
    try:
        common = {
            "generator": [torch.Generator().manual_seed(s) for s in seeds],
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "output_type": "np",
        }
        if isinstance(pipe, DiTPipeline):
            out = pipe(class_labels=list(conditions), **common)
        else:
            if negative_prompt is not None:
                common["negative_prompt"] = [negative_prompt] * len(conditions)
            if height is not None and width is not None:
                common.update(height=height, width=width)
            out = pipe(prompt=list(conditions), **common)
    finally:
        del pipe.vae.decode  # back to the class methods
        del pipe.scheduler.step
    images = np.rint(np.asarray(out.images) * 255).astype(np.uint8)
    return Samples(images, torch.cat(latents))


def generate(pipe, targets: list[Target], **kwargs) -> np.ndarray:
    """uint8 images for digit targets; see ``sample`` for the arguments."""
    return sample(pipe, conditions_for(pipe, targets), **kwargs).images
