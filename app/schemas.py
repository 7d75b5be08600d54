"""Request and response bodies on the wire (OpenAI Images fields plus our extensions)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CompareRequest",
    "CompareResponse",
    "CompareVariant",
    "GenerationRequest",
    "ImageData",
    "ImagesResponse",
    "JobCreated",
    "JobView",
    "ModelCapabilities",
    "ModelInfo",
    "ModelList",
    "VariantInfo",
]

MAX_SEED = 2**63 - 1


class GenerationRequest(BaseModel):
    """``POST /v1/images/generations`` and ``POST /v1/jobs``: OpenAI's parameters, each honoured
    or refused with 400 naming it (docs/service.md); a field this service does not know is
    refused too, never silently ignored."""

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
    moderation: Literal["auto", "low"] | None = Field(
        None, description='"low" or none: this service applies no content moderation'
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="DALL-E 3's; refused: these models have no style control"
    )
    user: str | None = Field(None, max_length=256)
    # Extensions.
    variant: str | None = Field(None, description="default: the model's default variant")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    negative_prompt: str | None = None


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
    schedulers: list[str] = Field(description="the samplers it runs (the folder's)")
    negative_prompt: bool
    output_formats: list[str]
    edits: bool = Field(description="POST /v1/images/edits (not served yet)")
    inpainting: bool
    previews: bool = Field(description="streamed partial images (not served yet)")


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
    queue_depth: int
    oldest_queued_s: float | None = None


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
