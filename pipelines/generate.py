"""Run a pipeline for a list of conditions, one seeded generator per image.

A condition is a class id (DiT-style pipelines) or a prompt (text-to-image pipelines). One seed
per image (``seed + i``) makes an image independent of how the list is batched, so the same
index gives the same image in a grid, an evaluation or a quantized-vs-FP comparison. The final
latents (what the VAE decodes) come back too, for SQNR on latents.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines import capabilities, schedulers
from pipelines.edit import Edit, dit_image_to_image, edit_pipeline

__all__ = [
    "Edit",
    "Samples",
    "decode",
    "final_latents",
    "guided_prediction",
    "is_class_conditional",
    "predicted_clean",
    "preview_steps",
    "run",
    "sample",
    "vae_latents",
]


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # uint8 (N, H, W, 3)
    latents: torch.Tensor  # (N, C, h, w), as given to the VAE decoder


def is_class_conditional(pipe) -> bool:
    """A DiT-style pipeline, asked with class ids rather than prompts."""
    return type(pipe).__name__ in capabilities.CLASS_CONDITIONAL


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
    scheduler: str | None = None,
    edit: Edit | None = None,
    on_step: Callable[[int, int], None] | None = None,
    preview_at: Sequence[int] = (),
    on_preview: Callable[[int, int, np.ndarray], None] | None = None,
) -> Samples:
    """One pipeline call: image i from ``conditions[i]`` with noise from ``seeds[i]``.

    ``scheduler``: a name of ``pipelines.schedulers`` (None: the folder's own). ``edit``: start
    from an image (image-to-image, or inpainting with its mask; ``pipelines.edit``).
    ``on_step(step, steps)`` is called after every denoising step (through the scheduler, so
    it works for every pipeline, DiT's included, which has no step callback); an exception it
    raises stops the call. After each step listed in ``preview_at``, ``on_preview(k, step,
    images)`` gets preview k: the VAE's decoding of the clean image the denoiser predicts at
    that step (uint8 (N, H, W, 3)).
    """
    if len(conditions) != len(seeds):
        raise ValueError("one seed per condition")
    schedulers.use(pipe, scheduler)
    sampler = type(pipe.scheduler).__name__
    asked = on_preview is not None and len(preview_at) > 0
    if asked and not capabilities.previews(type(pipe).__name__, sampler):
        raise ValueError(f"{type(pipe).__name__} sampled by {sampler} makes no previews")
    total = schedulers.steps_run(num_inference_steps, None if edit is None else edit.strength)
    previews = {step: k for k, step in enumerate(preview_at)}
    latents: list[torch.Tensor] = []
    vae = pipe.vae
    decode, step = vae.decode, pipe.scheduler.step
    done = 0

    def capturing_decode(z, *args, **kwargs):
        latents.append(z.detach().float().cpu().clone())
        return decode(z, *args, **kwargs)

    # the pipelines pass the scheduler's step what its signature takes (the generator of
    # an ancestral sampler): the wrapper shows the step's own signature
    @functools.wraps(step)
    def counting_step(model_output, timestep, sample, *args, **kwargs):
        nonlocal done
        out = step(model_output, timestep, sample, *args, **kwargs)
        done += 1
        if on_preview is not None and done in previews:
            clean = predicted_clean(pipe.scheduler, out, model_output, timestep, sample)
            pixels = _preview(pipe, decode, clean[: len(conditions)], height, width)
            on_preview(previews[done], done, pixels)
        if on_step is not None:
            on_step(min(done, total), total)
        return out

    vae.decode = capturing_decode
    pipe.scheduler.step = counting_step
    try:
        images = _call(
            pipe,
            conditions,
            seeds,
            num_inference_steps,
            guidance_scale,
            negative_prompt,
            height,
            width,
            edit,
        )
    finally:
        del vae.decode  # back to the class methods
        del pipe.scheduler.step
    return Samples(np.rint(np.asarray(images) * 255).astype(np.uint8), torch.cat(latents))


class _Decoding(Exception):
    """Raised from the VAE's decode by ``final_latents``: sampling is over, decoding skipped."""

    def __init__(self, latents: torch.Tensor) -> None:
        super().__init__("decoding skipped")
        self.latents = latents


@torch.no_grad()
def final_latents(
    pipe, conditions: list, seeds: list[int], *, num_inference_steps: int, guidance_scale: float
) -> torch.Tensor:
    """What ``run`` would decode (its ``Samples.latents``), without decoding it: the VAE is
    the costliest part of a sampling of few steps, and comparing latents needs none."""

    def stop(z, *args, **kwargs):
        raise _Decoding(z.detach().float().cpu().clone())

    schedulers.use(pipe, None)
    pipe.vae.decode = stop
    try:
        _call(pipe, conditions, seeds, num_inference_steps, guidance_scale, None, None, None, None)
    except _Decoding as done:
        return done.latents
    finally:
        del pipe.vae.decode
    raise RuntimeError("the pipeline returned without decoding its latents")


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W, 3) images of latents as ``final_latents`` returns them."""
    vae = pipe.vae
    return _pixels(vae.decode(latents.to(vae.device, vae.dtype)).sample)


def _call(pipe, conditions, seeds, steps, guidance_scale, negative_prompt, height, width, edit):
    """The pipeline's images, float (N, H, W, 3) in [0, 1]."""
    from PIL import Image

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    if is_class_conditional(pipe):
        if edit is None:
            out = pipe(
                class_labels=list(conditions),
                generator=generators,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                output_type="np",
            )
            return out.images
        if edit.mask is not None:
            raise ValueError("a class-conditional pipeline does not inpaint")
        return dit_image_to_image(
            pipe,
            list(conditions),
            generators,
            image=edit.image,
            strength=edit.strength,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
        )
    common = {
        "prompt": list(conditions),
        "generator": generators,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "output_type": "np",
    }
    if negative_prompt is not None:
        common["negative_prompt"] = [negative_prompt] * len(conditions)
    if height is not None and width is not None:
        common.update(height=height, width=width)
    if edit is None:
        return pipe(**common).images
    n = len(conditions)
    image = [Image.fromarray(edit.image)] * n
    if edit.mask is None:
        return edit_pipeline(pipe, inpaint=False)(
            image=image, strength=edit.strength, **common
        ).images
    mask = [Image.fromarray(edit.mask.astype(np.uint8) * 255)] * n
    made = edit_pipeline(pipe, inpaint=True)
    return made(image=image, mask_image=mask, strength=edit.strength, **common).images


def predicted_clean(scheduler, out, model_output, timestep, sample) -> torch.Tensor:
    """The clean latents the denoiser predicts at the step ``scheduler.step`` just took and
    returned ``out`` for: the scheduler's own ``pred_original_sample`` where it returns one
    (DDIM, Euler); for flow matching (SD3, Flux) ``x0 = x_t - sigma * v``, sigma being the
    scheduler's own for that step (its step index has moved on by one); else, from the model
    output and the noise level, ``x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a)`` (a =
    alphas_cumprod[t]) for epsilon prediction, its counterpart for v-prediction."""
    clean = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    clean = getattr(out, "pred_original_sample", clean)
    if clean is not None:
        return clean
    x, m = sample.float(), model_output.float()
    if type(scheduler).__name__ in capabilities.FLOW_MATCHING:
        sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device, torch.float32)
        return x - sigma * m
    alpha = scheduler.alphas_cumprod[int(timestep)].to(sample.device, torch.float32)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - alpha).sqrt() * m) / alpha.sqrt()
    if kind == "v_prediction":
        return alpha.sqrt() * x - (1 - alpha).sqrt() * m
    return m  # "sample": the output is the clean image


def vae_latents(
    pipe, latents: torch.Tensor, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """Latents as the denoiser sees them, made what the pipeline hands the VAE's decoder at
    its end: Flux's 2x2 patches unpacked (sampled at ``height`` x ``width``; None: the
    pipeline's default size), divided by the VAE's scaling factor (de-normalised where the VAE
    states latents_mean / latents_std, as SDXL does), the VAE's shift added (SD3, Flux)."""
    config = pipe.vae.config
    if latents.ndim == 3:  # Flux: (N, h/2 * w/2, 4C)
        scale = pipe.vae_scale_factor
        height = height or pipe.default_sample_size * scale
        width = width or pipe.default_sample_size * scale
        latents = pipe._unpack_latents(latents, height, width, scale)
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents) for v in (mean, std))
        return latents * std / config.scaling_factor + mean
    z = latents / config.scaling_factor
    shift = getattr(config, "shift_factor", None)
    return z if shift is None else z + shift


def _preview(pipe, decode, clean: torch.Tensor, height, width) -> np.ndarray:
    """uint8 (N, H, W, 3) of clean latents, decoded as the pipeline decodes its last ones.
    PixArt samples at the nearest size of its aspect-ratio bins and resizes the decoded image
    to the size asked (``use_resolution_binning``): its previews are resized the same way."""
    from diffusers.image_processor import PixArtImageProcessor

    decoded = decode(vae_latents(pipe, clean, height, width).to(pipe.vae.dtype)).sample
    binned = isinstance(getattr(pipe, "image_processor", None), PixArtImageProcessor)
    if binned and height and width and decoded.shape[-2:] != (height, width):
        decoded = pipe.image_processor.resize_and_crop_tensor(decoded, width, height)
    return _pixels(decoded)


def _pixels(decoded: torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W, 3) of the VAE's decoded images (in [-1, 1])."""
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return np.rint(pixels * 255).astype(np.uint8)


def preview_steps(steps: int, partial_images: int) -> list[int]:
    """The steps after which previews are made: ``partial_images`` evenly spaced before the
    last (fewer when there are fewer steps than that)."""
    chosen = {round(k * steps / (partial_images + 1)) for k in range(1, partial_images + 1)}
    return sorted(s for s in chosen if 1 <= s < steps)
