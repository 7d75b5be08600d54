"""Request and response bodies on the wire (OpenAI Images fields plus our extensions).

A request model turns itself into the JobRequest it asks for (``to_job_request``): it says
what it asks as an ``app.resolve.Ask``, and ``app.resolve`` checks that against the registry
and fills in the model's defaults. A new field is copied in one place, the model's ``_ask``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.config import Settings
from app.queue.records import JobRequest
from app.registry import Registry
from app.resolve import Ask, EditInputs, job_request

__all__ = [
    "AdapterInfo",
    "CompareRequest",
    "CompareResponse",
    "CompareVariant",
    "EditRequest",
    "GenerationRequest",
    "ImageData",
    "ImagesResponse",
    "JobCreated",
    "JobSubmission",
    "JobView",
    "LoraChoice",
    "ModelCapabilities",
    "ModelInfo",
    "ModelList",
    "VariantInfo",
]

MAX_SEED = 2**63 - 1
MAX_LORA_FIELD = 16  # a bound on the list itself; the model's max_lora is checked in resolve


class LoraChoice(BaseModel):
    """One adapter of ``lora``: a name of the model's ``adapters`` (GET /v1/models) and its
    scale (default: the adapter's own)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    scale: float | None = None
    sha256: str | None = Field(
        None,
        max_length=64,
        description="the adapter's file as an image's metadata names it: refused (400) when "
        "the adapter's file is now another",
    )


def _lora_pairs(
    choices: list[LoraChoice] | None,
) -> tuple[tuple[str, float | None, str | None], ...]:
    return tuple((c.name, c.scale, c.sha256) for c in choices or ())


_LORA_DESCRIPTION = (
    "LoRA adapters of the model (GET /v1/models lists them), applied beside its weights in "
    "this order: [{name, scale}], scale default the adapter's own, in -2..2"
)


class _ImageParameters(BaseModel):
    """What ``images.generate`` and ``images.edit`` share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a model of the registry (GET /v1/models)")
    prompt: str = Field(
        min_length=1, description="text; for a class-conditional model, text naming a class"
    )
    n: int = Field(1, ge=1)
    size: str | None = Field(
        None, description='"WxH" among the model\'s sizes, or "auto" (its first size)'
    )
    quality: Literal["auto", "standard", "low", "medium", "high", "hd", "xhigh", "max"] = Field(
        "auto",
        description="sampling steps when `steps` is not given: low = half the model's "
        "default, auto / standard / medium = the default, high / hd = twice it, xhigh three "
        "times, max four times (at most max_steps)",
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg and webp: the encoder's quality, 0-100"
    )
    background: Literal["auto", "opaque", "transparent"] = Field(
        "auto", description="transparent is refused: the models paint every pixel"
    )
    stream: bool = Field(
        False,
        description="answer Server-Sent Events: `partial_images` previews, then the image "
        "(OpenAI's image_generation.* / image_edit.* events); n must be 1",
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description="previews: the decoded prediction of the clean image at evenly spaced "
        "steps (fewer when there are fewer steps)",
    )
    user: str | None = Field(None, max_length=256)
    # Extensions.
    variant: str | None = Field(None, description="default: the model's default variant")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    scheduler: str | None = Field(
        None, description="a sampler of the model's `capabilities.schedulers`; default: its own"
    )
    lora: list[LoraChoice] | None = Field(
        None, max_length=MAX_LORA_FIELD, description=_LORA_DESCRIPTION
    )

    def to_job_request(
        self, settings: Settings, registry: Registry, edit: EditInputs | None
    ) -> JobRequest:
        """The job this request asks for (an edit of ``edit``'s image when given)."""
        return job_request(settings, registry, self._ask(), edit)

    def _ask(self) -> Ask:
        return Ask(
            model=self.model,
            prompt=self.prompt,
            variant=self.variant,
            n=self.n,
            size=self.size,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            negative_prompt=self.negative_prompt,
            output_format=self.output_format,
            output_compression=self.output_compression,
            quality=self.quality,
            background=self.background,
            scheduler=self.scheduler,
            partial_images=self.partial_images,
            stream=self.stream,
            lora=_lora_pairs(self.lora),
        )


class GenerationRequest(_ImageParameters):
    """``POST /v1/images/generations``: OpenAI's parameters, each honoured or refused with 400
    naming it (docs/service.md); a field this service does not know is refused too, never
    silently ignored."""

    moderation: Literal["auto", "low"] | None = Field(
        None, description='"low" or none: this service applies no content moderation'
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="DALL-E 3's; refused: these models have no style control"
    )

    def _ask(self) -> Ask:
        return replace(super()._ask(), moderation=self.moderation, style=self.style)


class EditRequest(_ImageParameters):
    """``POST /v1/images/edits`` (multipart/form-data): the fields besides the files `image`
    (or `image[]`, one) and `mask` (transparent = edit)."""

    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="how far the image is noised before it is denoised: small keeps more of "
        "it; default 0.8, with a mask 1.0",
    )
    input_fidelity: Literal["low", "high"] | None = Field(
        None, description="gpt-image's; refused: `strength` sets how much of the input stays"
    )

    def _ask(self) -> Ask:
        return replace(super()._ask(), strength=self.strength)


class JobSubmission(GenerationRequest):
    """``POST /v1/jobs``: a generation, or with `image` an edit (base64 or data URLs)."""

    image: str | None = Field(None, description="an image to edit: base64 or a data URL")
    mask: str | None = Field(None, description="its mask (transparent = edit): base64 or data URL")
    strength: float | None = Field(None, gt=0, le=1, description="as for /v1/images/edits")

    def _ask(self) -> Ask:
        return replace(super()._ask(), strength=self.strength)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    # Extensions: what ran and how long it took.
    id: str
    model: str
    variant: str
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None = None
    scheduler: str | None = None
    strength: float | None = None
    output_format: str
    timings: dict


class JobCreated(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: str
    position: int
    model: str
    variant: str


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: str
    progress: int
    step: int
    steps: int
    position: int
    model: str
    variant: str
    seed: int
    created: float
    timings: dict
    deliveries: int
    worker: str | None
    cancel_requested: bool
    error: dict | None
    images: list[str]
    previews: list[str] = Field(description="the previews made so far (partial_images)")
    result: dict


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str = Field(min_length=1)
    variants: list[str] | None = Field(
        None, min_length=1, description="default: every variant of the model"
    )
    reference: str | None = Field(None, description="default: the first full-precision variant")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    size: str | None = None
    negative_prompt: str | None = None
    scheduler: str | None = Field(None, description="as for generations")
    partial_images: int | None = Field(
        None, ge=0, le=3, description="previews on each variant's job events"
    )
    image: str | None = Field(None, description="edit this image (base64 or a data URL)")
    mask: str | None = Field(None, description="its mask, transparent = edit")
    strength: float | None = Field(None, gt=0, le=1, description="as for edits")
    lora: list[LoraChoice] | None = Field(
        None,
        max_length=MAX_LORA_FIELD,
        description="adapters applied on every variant compared, as for generations",
    )

    def to_job_requests(
        self,
        settings: Settings,
        registry: Registry,
        edit: EditInputs | None,
        variants: list[str],
        seed: int,
    ) -> list[JobRequest]:
        """One job per variant of ``variants`` (checked by ``app.comparison``), all at
        ``seed``."""
        ask = Ask(
            model=self.model,
            prompt=self.prompt,
            size=self.size,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=seed,
            negative_prompt=self.negative_prompt,
            scheduler=self.scheduler,
            partial_images=self.partial_images,
            strength=self.strength,
            lora=_lora_pairs(self.lora),
        )
        return [job_request(settings, registry, replace(ask, variant=v), edit) for v in variants]


class CompareVariant(BaseModel):
    variant: str
    quantized: bool
    job_id: str
    status: str
    progress: int
    b64_png: str | None
    url: str | None
    latency_s: float | None
    inference_s: float | None
    step_ms_median: float | None
    peak_memory_bytes: int | None
    denoiser_weight_bytes: int | None
    psnr_db: float | None
    ssim: float | None
    sqnr_latent_db: float | None
    error: str | None = None
    parameters: dict | None = Field(None, description="what the image says made it")
    previews: list[str] = []


class CompareResponse(BaseModel):
    id: str
    status: str  # "completed" once every variant's job has finished, else "in_progress"
    model: str
    prompt: str
    seed: int
    reference: str
    variants: list[CompareVariant]


class ModelCapabilities(BaseModel):
    """What a model's requests may ask for; the same for each of its variants."""

    sizes: list[str]
    steps: tuple[int, int] = Field(description="the range of `steps`")
    default_steps: int
    quality_steps: dict[str, int] = Field(description="the steps each `quality` runs")
    guidance_range: tuple[float, float]
    schedulers: list[str] = Field(description="what `scheduler` may name; the first is its own")
    default_scheduler: str | None = Field(description="the folder's sampler (diffusers class)")
    negative_prompt: bool
    output_formats: list[str]
    edits: bool = Field(description="POST /v1/images/edits: image-to-image with `strength`")
    inpainting: bool = Field(description="edits with a mask")
    previews: bool = Field(description="`partial_images`, streamed or on the job's events")
    max_partial_images: int


class VariantInfo(BaseModel):
    """A variant: how it is made (for an artifact: recipe, backend, bytes, the quality measured
    at quantization time) and its workers and queue now."""

    model_config = ConfigDict(extra="allow")

    id: str
    quantized: bool
    dtype: str
    require_worker: bool
    compile: bool
    workers: int
    resident: bool = Field(description="a live worker holds it loaded (else its next job loads it)")
    resident_bytes: int | None = Field(
        None, description="its denoiser's bytes in the worker's memory, when resident"
    )
    queue_depth: int
    oldest_queued_s: float | None = None


class AdapterInfo(BaseModel):
    """A LoRA adapter requests may name in ``lora``."""

    name: str
    scale: float = Field(description="the scale a request that gives none gets")
    sha256: str = Field(description="of its file: the worker refuses any other bytes")
    bytes: int | None


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "local"
    kind: str = Field(description="class-conditional or text-to-image")
    default_variant: str
    sizes: list[str]
    default_steps: int
    max_steps: int
    guidance_scale: float
    guidance_range: tuple[float, float]
    classes: list[str] | None = Field(description="class-conditional models: their labels")
    prompt_help: str
    capabilities: ModelCapabilities
    variants: list[VariantInfo]
    adapters: list[AdapterInfo] = Field(description="LoRA adapters for `lora`")
    max_lora: int = Field(description="the most adapters one request may name")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
