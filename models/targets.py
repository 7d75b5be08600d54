"""What the embedded digits models are asked: digit targets, their prompts or class ids."""

from __future__ import annotations

import numpy as np
import torch

from models.architectures import NULL_CLASS
from models.data import COLOR_NAMES, DIGIT_WORDS, Target, caption, draw_colors
from models.tokenizer import MAX_LENGTH
from pipelines.generate import is_class_conditional, sample

__all__ = ["conditions_for", "denoiser_inputs", "evaluation_targets", "generate", "prompt_for"]


def prompt_for(target: Target) -> str:
    """The text a target is asked with: a caption, or the digit word when no colors are set."""
    if target.fg is None or target.bg is None:
        return DIGIT_WORDS[target.digit]
    return caption(target.digit, target.fg, target.bg)


def conditions_for(pipe, targets: list[Target]) -> list[int] | list[str]:
    """Class ids for a class-conditional pipeline, prompts for a text-to-image one."""
    if is_class_conditional(pipe):
        return [t.digit for t in targets]
    return [prompt_for(t) for t in targets]


@torch.no_grad()
def denoiser_inputs(
    pipe, targets: list[Target], latents: torch.Tensor, timesteps: torch.Tensor
) -> dict:
    """Keyword arguments of one denoiser call: ``latents`` at ``timesteps`` for each of
    ``targets`` and, last, the unconditional branch (DiT's null class, the empty prompt), as
    a guided batch asks; ``latents`` hold one more sample than ``targets``."""
    if is_class_conditional(pipe):
        labels = torch.tensor([*conditions_for(pipe, targets), NULL_CLASS])
        return {"hidden_states": latents, "timestep": timesteps, "class_labels": labels}
    ids = pipe.tokenizer(
        [*conditions_for(pipe, targets), ""],
        padding="max_length",
        max_length=MAX_LENGTH,
        return_tensors="pt",
    ).input_ids
    context = pipe.text_encoder(ids)[0]
    return {"sample": latents, "timestep": timesteps, "encoder_hidden_states": context}


def evaluation_targets(n: int, *, with_colors: bool, seed: int = 0) -> list[Target]:
    """n targets cycling through the digits; color pairs drawn from a seeded generator."""
    fg, bg = draw_colors(np.random.default_rng(seed), n)
    return [
        Target(i % 10, COLOR_NAMES[fg[i]], COLOR_NAMES[bg[i]]) if with_colors else Target(i % 10)
        for i in range(n)
    ]


def generate(pipe, targets: list[Target], **kwargs) -> np.ndarray:
    """uint8 images for digit targets; see ``sample`` for the arguments."""
    return sample(pipe, conditions_for(pipe, targets), **kwargs).images
