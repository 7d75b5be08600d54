"""A wire request checked against the registry and the settings, turned into a JobRequest.

The request models of ``app.schemas`` give what they ask as an ``Ask``; ``job_request`` fills
in the model's defaults and refuses what the model or the service cannot do. Every refusal
names the parameter at fault (400), or the unknown model / variant (404).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from app.config import Settings
from app.errors import InvalidRequest, NotFound
from app.queue.records import JobRequest
from app.registry import CLASS_CONDITIONAL, LORA_SCALE_LIMIT, ModelSpec, Registry
from app.sizes import Size, parse_size
from app.uploads import Upload, open_image, prepare
from pipelines.schedulers import name_of, steps_run

__all__ = [
    "EDIT_STRENGTH",
    "MAX_PARTIAL_IMAGES",
    "QUALITY_STEPS",
    "Ask",
    "EditInputs",
    "allowed_size",
    "edit_inputs",
    "job_request",
    "model_spec",
    "steps_for",
    "variant_name",
]

MAX_PARTIAL_IMAGES = 3  # OpenAI's bound of partial_images
# the strength of an edit that names none: image-to-image keeps the input's layout, inpainting
# paints the masked area from pure noise (the rest is kept by the mask)
EDIT_STRENGTH = {"image": 0.8, "mask": 1.0}


@dataclass(frozen=True)
class Ask:
    """What a request asks for, as sent: None (or the default here) leaves the choice to the
    model's registry entry. OpenAI's parameters the service refuses (``moderation``, ``style``,
    ``background`` ...) are here so that they are refused by name."""

    model: str
    prompt: str
    variant: str | None = None
    n: int = 1
    size: str | None = None  # "WxH", "auto" or None: the model's first size
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    output_format: str = "png"
    output_compression: int | None = None
    quality: str = "auto"
    background: str = "auto"
    moderation: str | None = None
    style: str | None = None
    scheduler: str | None = None
    partial_images: int | None = None
    stream: bool = False
    strength: float | None = None
    # (adapter, scale or None for its default, sha256 its file must have or None)
    lora: tuple[tuple[str, float | None, str | None], ...] = ()


@dataclass(frozen=True)
class EditInputs:
    """An edit's input image and mask, checked and brought to its output size (``edit_inputs``),
    ready to be stored beside its jobs."""

    size: Size
    image: Upload
    mask: Upload | None = None


def model_spec(registry: Registry, name: str) -> ModelSpec:
    spec = registry.get(name)
    if spec is None:
        raise NotFound(
            f"the model {name!r} does not exist; models: {', '.join(registry.models)}",
            param="model",
            code="model_not_found",
        )
    return spec


def variant_name(spec: ModelSpec, variant: str | None) -> str:
    variant = spec.default_variant if variant is None else variant  # "" names no variant
    if variant not in spec.variants:
        raise NotFound(
            f"{spec.name} has no variant {variant!r}; variants: {', '.join(spec.variants)}",
            param="variant",
            code="variant_not_found",
        )
    return variant


def allowed_size(spec: ModelSpec, size: str | None) -> Size:
    """One of the model's sizes (None: its first), or 400 naming `size`."""
    size = size or spec.sizes[0]
    if size not in spec.sizes:
        raise InvalidRequest(
            f"size {size!r} is not allowed for {spec.name}; allowed: {', '.join(spec.sizes)}",
            param="size",
        )
    return parse_size(size)


def job_request(
    settings: Settings, registry: Registry, ask: Ask, edit: EditInputs | None = None
) -> JobRequest:
    """The job that runs ``ask`` (an edit of ``edit``'s image, at its size, when given)."""
    spec = model_spec(registry, ask.model)
    variant = variant_name(spec, ask.variant)
    prompt, negative_prompt, n = ask.prompt, ask.negative_prompt, ask.n
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"prompt is {len(prompt)} characters; at most {settings.max_prompt_chars}",
            param="prompt",
        )
    if not prompt.strip():
        raise InvalidRequest("prompt is empty", param="prompt")
    if negative_prompt is not None and len(negative_prompt) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"negative_prompt is longer than {settings.max_prompt_chars} characters",
            param="negative_prompt",
        )
    if n > settings.max_n:
        raise InvalidRequest(f"n is {n}; at most {settings.max_n}", param="n")
    _refuse_unsupported(ask)
    size = edit.size if edit else allowed_size(spec, None if ask.size == "auto" else ask.size)
    steps = steps_for(spec, ask.quality) if ask.steps is None else ask.steps
    if not 1 <= steps <= spec.max_steps:
        raise InvalidRequest(f"steps must lie in 1..{spec.max_steps}", param="steps")
    guidance = spec.guidance if ask.guidance_scale is None else ask.guidance_scale
    low, high = spec.guidance_range
    if not (math.isfinite(guidance) and low <= guidance <= high):
        raise InvalidRequest(f"guidance_scale must lie in {low}..{high}", param="guidance_scale")
    scheduler = ask.scheduler
    if scheduler is not None and scheduler not in spec.schedulers:
        offered = ", ".join(spec.schedulers) or "only its own"
        raise InvalidRequest(
            f"{spec.name} has no scheduler {scheduler!r}; it offers {offered}", param="scheduler"
        )
    if ask.stream and n > 1:
        raise InvalidRequest("a streamed request makes one image (n = 1)", param="n")
    partial_images = ask.partial_images or 0
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise InvalidRequest(
            f"partial_images must lie in 0..{MAX_PARTIAL_IMAGES}", param="partial_images"
        )
    if partial_images and not spec.previews:
        raise InvalidRequest(f"{spec.name} makes no previews", param="partial_images")
    strength = _edit_strength(spec, edit, ask.strength)
    if edit is not None and steps_run(steps, strength) < 1:
        raise InvalidRequest(
            f"strength {strength:g} of {steps} steps runs none; raise strength or steps",
            param="strength",
        )
    class_id = None
    if spec.kind == CLASS_CONDITIONAL:
        match = spec.find_class(prompt)
        class_id = match.class_id
        if class_id is None and len(match.named) > 1:
            raise InvalidRequest(
                f"{spec.name} is class-conditional and the prompt names several classes "
                f"({', '.join(match.named[:6])}); name one",
                param="prompt",
            )
        if class_id is None:
            examples = ", ".join(f'"a {label}"' for label in list(spec.labels)[1:8:2])
            raise InvalidRequest(
                f"{spec.name} is class-conditional: the prompt must name one of its classes "
                f"(e.g. {examples}; GET /v1/models lists them); got {prompt[:60]!r}",
                param="prompt",
            )
        if negative_prompt is not None:
            raise InvalidRequest(
                f"{spec.name} is class-conditional and takes no negative_prompt",
                param="negative_prompt",
            )
    return JobRequest(
        model=spec.name,
        variant=variant,
        prompt=prompt,
        n=n,
        width=size.width,
        height=size.height,
        steps=steps,
        guidance_scale=float(guidance),
        seed=secrets.randbelow(2**31) if ask.seed is None else ask.seed,
        output_format=ask.output_format,
        negative_prompt=negative_prompt,
        output_compression=ask.output_compression,
        class_id=class_id,
        scheduler=scheduler or name_of(spec.scheduler),
        partial_images=partial_images,
        image=None if edit is None else edit.image.sha256,
        mask=None if edit is None or edit.mask is None else edit.mask.sha256,
        strength=strength,
        lora=_lora(spec, ask.lora),
    )


def _lora(spec: ModelSpec, asked: tuple[tuple[str, float | None, str | None], ...]) -> tuple:
    """The adapters a request names, each with its scale (None: the adapter's default), in
    its order; 400 naming `lora` for an unknown or repeated name, a scale out of range, a
    sha256 other than the adapter file's (an image's metadata asked again after the file
    changed), or more adapters than the model allows."""
    if not asked:
        return ()
    if not spec.adapters:
        raise InvalidRequest(f"{spec.name} has no LoRA adapters", param="lora")
    if len(asked) > spec.max_lora:
        raise InvalidRequest(
            f"lora names {len(asked)} adapters; {spec.name} applies at most {spec.max_lora}",
            param="lora",
        )
    chosen: list[tuple[str, float]] = []
    for name, scale, sha256 in asked:
        adapter = spec.adapters.get(name)
        if adapter is None:
            raise InvalidRequest(
                f"lora: {spec.name} has no adapter {name!r}; adapters: {', '.join(spec.adapters)}",
                param="lora",
            )
        if any(name == n for n, _ in chosen):
            raise InvalidRequest(f"lora names {name!r} twice", param="lora")
        if sha256 is not None and sha256 != adapter.sha256:
            raise InvalidRequest(
                f"lora: the adapter {name!r} is now the file {adapter.sha256[:12]}..., not "
                f"{sha256[:12]}...: the same name no longer makes the same images",
                param="lora",
            )
        scale = adapter.scale if scale is None else scale
        if not (math.isfinite(scale) and abs(scale) <= LORA_SCALE_LIMIT):
            raise InvalidRequest(
                f"lora: the scale of {name!r} must lie in "
                f"-{LORA_SCALE_LIMIT:g}..{LORA_SCALE_LIMIT:g}; got {scale:g}",
                param="lora",
            )
        chosen.append((name, float(scale)))
    return tuple(chosen)


def _edit_strength(
    spec: ModelSpec, edit: EditInputs | None, strength: float | None
) -> float | None:
    """The strength an edit runs at (None: not an edit); 400 for what the model cannot edit."""
    if edit is None:
        if strength is not None:
            raise InvalidRequest("strength applies to edits: send an image", param="strength")
        return None
    if not spec.edits:
        raise InvalidRequest(f"{spec.name} does not edit images", param="image")
    if edit.mask is not None and not spec.inpainting:
        raise InvalidRequest(
            f"{spec.name} does not inpaint (it is {spec.kind}); send no mask for image-to-image",
            param="mask",
        )
    if strength is None:
        return EDIT_STRENGTH["mask" if edit.mask is not None else "image"]
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise InvalidRequest("strength must lie in (0, 1]", param="strength")
    return float(strength)


def edit_inputs(
    registry: Registry, model: str, size: str | None, image: bytes | None, mask: bytes | None
) -> EditInputs | None:
    """An edit's image and mask prepared at its output size (``size``; for none or "auto" the
    input's own size when the model makes it, else the model's first); None when there is no
    image, so no edit."""
    if image is None:
        if mask is not None:
            raise InvalidRequest("a mask needs an image to edit", param="mask")
        return None
    spec = model_spec(registry, model)
    picture = open_image(image)
    if size is None or size == "auto":
        own = str(Size(*picture.size))
        size = own if own in spec.sizes else spec.sizes[0]
    chosen = allowed_size(spec, size)
    prepared, shape = prepare(picture, mask, chosen.width, chosen.height)
    return EditInputs(chosen, prepared, shape)


# OpenAI's quality names (gpt-image's and DALL-E 3's) as multiples of the default steps
QUALITY_STEPS = {
    "low": 0.5,
    "auto": 1.0,
    "standard": 1.0,
    "medium": 1.0,
    "high": 2.0,
    "hd": 2.0,
    "xhigh": 3.0,
    "max": 4.0,
}


def steps_for(spec: ModelSpec, quality: str) -> int:
    """Sampling steps for an OpenAI ``quality``: a multiple of the model's default steps."""
    return max(1, min(spec.max_steps, round(spec.default_steps * QUALITY_STEPS[quality])))


def _refuse_unsupported(ask: Ask) -> None:
    """OpenAI parameters this service cannot honour: 400 naming them, never ignored."""
    if ask.output_compression is not None and ask.output_format == "png":
        raise InvalidRequest(
            "output_compression applies to jpeg and webp; png is lossless",
            param="output_compression",
        )
    if ask.background == "transparent":
        raise InvalidRequest(
            "background 'transparent' is not supported: the models paint every pixel "
            "(use auto or opaque)",
            param="background",
        )
    if ask.moderation == "auto":
        raise InvalidRequest(
            "this service applies no content moderation; send moderation 'low' or none",
            param="moderation",
        )
    if ask.style is not None:
        raise InvalidRequest(
            "style is DALL-E 3's; these models have no style control", param="style"
        )
