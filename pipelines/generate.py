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

__all__ = ["Samples", "guided_prediction", "is_class_conditional", "run", "sample"]


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # uint8 (N, H, W, 3)
    latents: torch.Tensor  # (N, C, h, w), as given to the VAE decoder


def is_class_conditional(pipe) -> bool:
    """A DiT-style pipeline, asked with class ids rather than prompts."""
    from diffusers import DiTPipeline

    return isinstance(pipe, DiTPipeline)


def guided_prediction(pipe, guidance_scale: float) -> Callable | None:
    """What the sampler makes of one denoiser output under classifier-free guidance: the batch
    holds both branches, and the step uses ``uncond + g * (cond - uncond)`` of the predicted
    noise (the first latent-channels of the output; learned-variance channels are not
    guided). None when the pipeline samples without guidance (g <= 1: one branch)."""
    if guidance_scale <= 1.0:
        return None
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    latent = denoiser.config.in_channels
    cond_first = is_class_conditional(pipe)  # DiT: [cond, uncond]; SD, PixArt: [uncond, cond]

    def guided(out: torch.Tensor) -> torch.Tensor:
        first, second = out[:, :latent].chunk(2)
        cond, uncond = (first, second) if cond_first else (second, first)
        return uncond + guidance_scale * (cond - uncond)

    return guided


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
