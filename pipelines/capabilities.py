"""What the service's code can do with each diffusers pipeline class: ask it with class ids,
edit with it (image-to-image), inpaint with it, and preview its sampling.

The one truth for both sides: the API reads ``capabilities()`` (``GET /v1/models``, the checks
of a request) and the worker's code runs from the same tables (``pipelines.edit`` builds the
edit pipelines named here, ``pipelines.generate`` makes previews only where they are listed),
so the service offers nothing its code does not run. Every class listed is served end to end
by ``tests/service/test_families.py``. Torch-free: the API process imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CLASS_CONDITIONAL",
    "DDPM_SCHEDULERS",
    "FLOW_MATCHING",
    "IMAGE_TO_IMAGE",
    "INPAINTING",
    "PREVIEW_PIPELINES",
    "Capabilities",
    "capabilities",
    "previews",
]

# the diffusers pipeline that edits a text-to-image class, built on its very components
# (``from_pipe``: a quantized or compiled denoiser edits too); the same as diffusers'
# AutoPipelineForImage2Image / AutoPipelineForInpainting pick. PixArt-α and -Σ have neither.
IMAGE_TO_IMAGE = {
    "StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusion3Pipeline": "StableDiffusion3Img2ImgPipeline",
    "FluxPipeline": "FluxImg2ImgPipeline",
}
INPAINTING = {
    "StableDiffusionPipeline": "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLInpaintPipeline",
    "StableDiffusion3Pipeline": "StableDiffusion3InpaintPipeline",
    "FluxPipeline": "FluxInpaintPipeline",
}
# asked with class ids; image-to-image by ``pipelines.edit.dit_image_to_image``, no inpainting
CLASS_CONDITIONAL = frozenset({"DiTPipeline"})
# the pipelines whose latents ``pipelines.generate`` hands the VAE as they do for a preview
# (Flux's packed in 2x2 patches, SD3's and Flux's shifted, PixArt's at a binned resolution)
PREVIEW_PIPELINES = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "PixArtAlphaPipeline",
        "PixArtSigmaPipeline",
        "DiTPipeline",
    }
)
# samplers whose clean-image prediction ``pipelines.generate.predicted_clean`` computes
# (tests/test_previews.py checks each against the x0 it was given): flow matching
# (x0 = x_t - sigma * v), and those of a discrete-time noise schedule (the sampler's own
# pred_original_sample, else from alphas_cumprod)
FLOW_MATCHING = frozenset({"FlowMatchEulerDiscreteScheduler"})
DDPM_SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "DEISMultistepScheduler",
        "DPMSolverMultistepScheduler",
        "EulerAncestralDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LMSDiscreteScheduler",
        "PNDMScheduler",
        "UniPCMultistepScheduler",
    }
)


@dataclass(frozen=True)
class Capabilities:
    class_conditional: bool  # asked with class ids (a prompt names the class), not prompts
    edits: bool  # image-to-image: an input image noised to a strength and denoised
    inpainting: bool  # edits with a mask
    previews: bool  # partial_images: the predicted clean image decoded at chosen steps


def previews(pipeline: str | None, scheduler: str | None) -> bool:
    """Whether a pipeline class sampled by a scheduler class makes previews."""
    return pipeline in PREVIEW_PIPELINES and scheduler in FLOW_MATCHING | DDPM_SCHEDULERS


def capabilities(pipeline: str | None, scheduler: str | None) -> Capabilities:
    """What a model whose folder names ``pipeline`` and ``scheduler`` (its model_index.json's
    ``_class_name`` and its scheduler config's) is served with. An unknown class (None: a hub id
    whose folder was not read) gets plain generation only."""
    class_conditional = pipeline in CLASS_CONDITIONAL
    return Capabilities(
        class_conditional=class_conditional,
        edits=pipeline in IMAGE_TO_IMAGE or class_conditional,
        inpainting=pipeline in INPAINTING,
        previews=previews(pipeline, scheduler),
    )
