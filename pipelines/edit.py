"""Image-to-image and inpainting from a loaded text-to-image or class-conditional pipeline.

``strength`` is SDEdit's: the input image is encoded, noised to the timestep a fraction
``strength`` of the way up the schedule, and denoised from there with the request's prompt
(strength 1: nothing of the image is left but its mask; 0.3: small changes). Of ``steps``
scheduled steps, ``int(steps * strength)`` run.

Stable Diffusion style pipelines get diffusers' own image-to-image and inpainting pipelines
built from the same components (``from_pipe``: no weight is copied, so a quantized or compiled
denoiser edits too; a 4-channel UNet inpaints by putting the noised known latents back at every
step). DiTPipeline has no image-to-image; ``dit_image_to_image`` runs DiT's sampling loop from
the noised image latents. Inpainting a class-conditional model is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.schedulers import steps_run

__all__ = ["Edit", "dit_image_to_image", "edit_pipeline"]

NULL_CLASS = 1000  # the class id DiTPipeline gives the unconditional branch


@dataclass(frozen=True)
class Edit:
    image: np.ndarray  # uint8 (H, W, 3), at the output size
    strength: float  # in (0, 1]
    mask: np.ndarray | None = None  # bool (H, W): True where the image is painted anew


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (1, 3, H, W) in [-1, 1], what a VAE encodes."""
    # np.array copies: a decoded upload is read-only, which torch.from_numpy warns about
    pixels = torch.from_numpy(np.array(image, np.float32)).div(127.5).sub(1.0)
    return pixels.permute(2, 0, 1).unsqueeze(0)


def edit_pipeline(pipe, inpaint: bool):
    """diffusers' image-to-image (or inpainting) pipeline on ``pipe``'s components, made once
    per pipeline and given its current scheduler at every call."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    cache = pipe.__dict__.setdefault("_edit_pipelines", {})
    if inpaint not in cache:
        auto = AutoPipelineForInpainting if inpaint else AutoPipelineForImage2Image
        made = auto.from_pipe(pipe)
        made.set_progress_bar_config(disable=True)
        cache[inpaint] = made
    made = cache[inpaint]
    made.scheduler = pipe.scheduler
    return made


@torch.no_grad()
def dit_image_to_image(
    pipe,
    class_labels: list[int],
    generators: list[torch.Generator],
    *,
    image: np.ndarray,
    strength: float,
    num_inference_steps: int,
    guidance_scale: float,
) -> np.ndarray:
    """DiTPipeline's sampling loop started from ``image`` noised to ``strength``; float
    images (N, H, W, 3) in [0, 1] as ``output_type="np"`` gives them."""
    transformer, vae, scheduler = pipe.transformer, pipe.vae, pipe.scheduler
    device, dtype = pipe._execution_device, transformer.dtype
    n = len(class_labels)
    scheduler.set_timesteps(num_inference_steps, device=device)
    start = num_inference_steps - steps_run(num_inference_steps, strength)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    encoded = vae.encode(to_tensor(image).to(device, vae.dtype)).latent_dist.mean
    clean = (encoded * vae.config.scaling_factor).to(dtype).expand(n, -1, -1, -1)
    noise = torch.cat(
        [torch.randn(clean.shape[1:], generator=g, dtype=dtype).unsqueeze(0) for g in generators]
    ).to(device)
    latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(n))
    guided = guidance_scale > 1
    labels = torch.tensor(class_labels, device=device)
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    channels = transformer.config.in_channels
    for t in timesteps:
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        out = transformer(
            model_input, timestep=t.reshape(1).expand(len(model_input)), class_labels=labels
        ).sample
        eps = out[:, :channels]
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
