"""A wire request checked against the registry and the settings, turned into a JobRequest.

Every refusal names the parameter at fault (400), or the unknown model / variant (404).
"""

from __future__ import annotations

import math
import secrets

from app.config import Settings
from app.errors import InvalidRequest, NotFound
from app.queue.records import JobRequest
from app.registry import CLASS_CONDITIONAL, ModelSpec, Registry

__all__ = ["job_request", "model_spec", "parse_size", "variant_name"]


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


def parse_size(spec: ModelSpec, size: str | None) -> tuple[int, int]:
    size = size or spec.sizes[0]
    if size not in spec.sizes:
        raise InvalidRequest(
            f"size {size!r} is not allowed for {spec.name}; allowed: {', '.join(spec.sizes)}",
            param="size",
        )
    width, height = (int(x) for x in size.split("x"))
    return width, height


def job_request(
    settings: Settings,
    registry: Registry,
    *,
    model: str,
    prompt: str,
    variant: str | None = None,
    n: int = 1,
    size: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    negative_prompt: str | None = None,
    output_format: str = "png",
    output_compression: int | None = None,
    quality: str = "auto",
    background: str = "auto",
    moderation: str | None = None,
    style: str | None = None,
) -> JobRequest:
    spec = model_spec(registry, model)
    variant = variant_name(spec, variant)
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
    _refuse_unsupported(output_format, output_compression, background, moderation, style)
    width, height = parse_size(spec, None if size == "auto" else size)
    steps = steps_for(spec, quality) if steps is None else steps
    if not 1 <= steps <= spec.max_steps:
        raise InvalidRequest(f"steps must lie in 1..{spec.max_steps}", param="steps")
    guidance = spec.guidance if guidance_scale is None else guidance_scale
    low, high = spec.guidance_range
    if not (math.isfinite(guidance) and low <= guidance <= high):
        raise InvalidRequest(f"guidance_scale must lie in {low}..{high}", param="guidance_scale")
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
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance),
        seed=secrets.randbelow(2**31) if seed is None else seed,
        output_format=output_format,
        negative_prompt=negative_prompt,
        output_compression=output_compression,
        class_id=class_id,
    )


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


def _refuse_unsupported(
    output_format: str,
    output_compression: int | None,
    background: str,
    moderation: str | None,
    style: str | None,
) -> None:
    """OpenAI parameters this service cannot honour: 400 naming them, never ignored."""
    if output_compression is not None and output_format == "png":
        raise InvalidRequest(
            "output_compression applies to jpeg and webp; png is lossless",
            param="output_compression",
        )
    if background == "transparent":
        raise InvalidRequest(
            "background 'transparent' is not supported: the models paint every pixel "
            "(use auto or opaque)",
            param="background",
        )
    if moderation == "auto":
        raise InvalidRequest(
            "this service applies no content moderation; send moderation 'low' or none",
            param="moderation",
        )
    if style is not None:
        raise InvalidRequest(
            "style is DALL-E 3's; these models have no style control", param="style"
        )
