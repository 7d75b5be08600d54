"""Load one registry variant as a diffusers pipeline and run a batch of jobs through it."""

from __future__ import annotations

import io
import os
import resource
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.provenance import image_parameters, save_options
from app.queue.records import JobRequest
from app.registry import CLASS_CONDITIONAL, ModelSpec, VariantSpec
from app.sizes import parse_size
from app.worker import adapters as lora_adapters
from app.worker.components import Components, Identity, estimate_bytes, module_bytes
from pipelines import generate
from pipelines.loader import compile_denoiser, load_pipeline

__all__ = [
    "Loaded",
    "Output",
    "component_identities",
    "encode_image",
    "estimate_bytes_needed",
    "load",
    "local_folder",
    "peak_memory",
    "pick_device",
    "reset_peak_memory",
    "run_batch",
    "user_of",
    "warm_up",
]

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass
class Loaded:
    pipe: object
    device: str
    denoiser_weight_bytes: int
    load_seconds: float
    made_by: dict | None = None  # what images say made them (app.provenance); None: nothing
    adapters: lora_adapters.Adapters = field(default_factory=dict)  # the model's LoRA


@dataclass
class Output:
    images: list[bytes]
    latents: np.ndarray  # float32 (n, C, h, w)


NOT_SHARED = {"scheduler"}  # stateful while it runs: each variant's pipeline has its own


def user_of(spec: ModelSpec, variant: VariantSpec) -> str:
    return f"{spec.name}/{variant.name}"


def load(
    spec: ModelSpec,
    variant: VariantSpec,
    device: str,
    components: Components | None = None,
    *,
    metadata: bool = True,
    compile_cache: str | None = None,
    adapters: lora_adapters.Adapters | None = None,
) -> Loaded:
    """The pipeline of a variant on ``device``: full precision or a quantized artifact's
    denoiser, with the model's other components taken from ``components`` where another
    variant loaded them already (and held there for the next), its denoiser ``torch.compile``d
    when the variant says so (compiled at the worker's warm-up; ``compile_cache`` keeps the
    generated code, so a restarted worker reuses it). A quantized denoiser is built exactly as
    ``quantization.load_quantized`` builds it. ``metadata``: its images carry their parameters
    and what made them. ``adapters``: the model's LoRA adapters (``adapters.read_all``),
    given room beside the denoiser's layers before it is compiled."""
    t0 = time.perf_counter()
    components = components if components is not None else Components()
    if variant.compile and compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
    user, dtype = user_of(spec, variant), variant.dtype
    given: dict = {}
    if variant.quantized:
        from quantization.artifact import load_quantized_denoiser

        assert variant.artifact is not None
        manifest, denoiser = load_quantized_denoiser(variant.artifact)
        attr, folder = manifest["denoiser"], str(variant.artifact)
        given[attr] = denoiser
        weight_bytes = int(manifest.get("sizes", {}).get("denoiser_weight_bytes", 0))
    else:
        folder = spec.source
        attr = _denoiser_name(folder)
    identities = component_identities(spec, variant, device)
    for name, identity in identities.items():
        module = components.get(identity)
        if module is not None and name not in given:
            given[name] = module
    pipe = load_pipeline(folder, torch_dtype=TORCH_DTYPES[dtype], **given)
    pipe.to(device)
    for name, identity in identities.items():
        if getattr(pipe, name, None) is not None:
            components.hold(identity, getattr(pipe, name), user)
    if not variant.quantized:
        weight_bytes = module_bytes(getattr(pipe, attr))
    adapters = adapters or {}
    lora_adapters.attach(
        getattr(pipe, attr), adapters, spec.max_lora, TORCH_DTYPES[dtype], variant.compile
    )
    if variant.compile:
        compile_denoiser(pipe)
    pipe.set_progress_bar_config(disable=True)
    made_by = _made_by(spec, variant, pipe) if metadata else None
    seconds = time.perf_counter() - t0
    return Loaded(pipe, device, weight_bytes, seconds, made_by, adapters)


def component_identities(spec: ModelSpec, variant: VariantSpec, device: str) -> dict[str, Identity]:
    """What each component of a variant's pipeline is, by identity: a quantized variant's
    denoiser is its artifact's; its other components are the model's own where the artifact
    holds byte-identical copies (``shared_components``), so they are shared with the model's
    other variants. The scheduler is left out (never shared)."""
    if variant.quantized:
        from quantization.artifact import shared_components

        folder = str(variant.artifact)
        same = shared_components(folder, spec.source) if Path(spec.source).is_dir() else set()
    else:
        folder, same = spec.source, None
    identities = {}
    for name in _component_names(folder):
        if name in NOT_SHARED:
            continue
        source = spec.source if same is None or name in same else folder
        identities[name] = Identity(source, name, variant.dtype, device)
    return identities


def estimate_bytes_needed(
    spec: ModelSpec, variant: VariantSpec, device: str, components: Components
) -> int:
    """Bytes that loading the variant adds to what ``components`` holds: its denoiser, and
    the components it shares that no resident variant holds yet (read from the weight
    files' headers; a quantized denoiser's from its manifest)."""
    held = components.bytes()
    total = 0
    for name, identity in component_identities(spec, variant, device).items():
        if identity in held:
            continue
        if variant.quantized and name == variant.manifest["denoiser"]:
            total += int(variant.manifest.get("sizes", {}).get("denoiser_weight_bytes", 0))
            continue
        folder = local_folder(identity.source)
        if folder is not None:
            total += estimate_bytes(folder / name, variant.dtype) or 0
    return total


def local_folder(source: str) -> Path | None:
    """A pipeline folder on disk: the source itself, or its snapshot in the local hub cache."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached: its size is learnt by loading it
        return None


def _component_names(source: str) -> list[str]:
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source, local_files_only=True)
    return [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list | tuple) and value[0] is not None
    ]


def _denoiser(pipe):
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def _denoiser_name(source: str) -> str:
    return "transformer" if "transformer" in _component_names(source) else "unet"


def _made_by(spec: ModelSpec, variant: VariantSpec, pipe) -> dict:
    """Model, variant and scheduler; for an artifact its recipe and the sha256 of its manifest
    (which holds the sha256 of every weight file, so it names the weights exactly)."""
    made_by: dict = {
        "model": spec.name,
        "variant": variant.name,
        "dtype": variant.dtype,
        "scheduler": type(pipe.scheduler).__name__,
    }
    if variant.quantized:
        from quantization.artifact import sha256_of

        made_by["recipe"] = variant.manifest.get("recipe", {}).get("name")
        made_by["backend"] = variant.manifest.get("backend")
        made_by["artifact_sha256"] = sha256_of(Path(str(variant.artifact)) / "manifest.json")
    return made_by


def run_batch(
    loaded: Loaded,
    spec: ModelSpec,
    requests: list[JobRequest],
    on_step: Callable[[int, int], None],
    *,
    image: bytes | None = None,
    mask: bytes | None = None,
    on_preview: Callable[[int, int, list[list[bytes]]], None] | None = None,
) -> list[Output]:
    """One pipeline call for jobs that share a batch key (size, steps, guidance, scheduler,
    edit inputs); image i of a job is seeded with ``seed + i``, so a job gets the same noise
    whichever batch it is in. ``image`` / ``mask``: the PNG inputs of an edit. With
    ``partial_images``, ``on_preview(k, step, previews)`` gets each job's encoded previews."""
    first = requests[0]
    if loaded.adapters:
        lora_adapters.apply(_denoiser(loaded.pipe), loaded.adapters, first.lora)
    conditions: list = []
    seeds: list[int] = []
    for r in requests:
        condition = r.class_id if spec.kind == CLASS_CONDITIONAL else r.prompt
        conditions += [condition] * r.n
        seeds += [r.seed + i for i in range(r.n)]

    def previews(k: int, step: int, pixels: np.ndarray) -> None:
        assert on_preview is not None
        parts, start = [], 0
        for r in requests:
            parts.append(
                [
                    encode_image(p, r.output_format, r.output_compression)
                    for p in pixels[start : start + r.n]
                ]
            )
            start += r.n
        on_preview(k, step, parts)

    edit = None
    if image is not None:
        assert first.strength is not None  # resolve sets it on every edit
        edit = _edit(image, mask, first.strength)
    samples = generate.run(
        loaded.pipe,
        conditions,
        seeds,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale,
        negative_prompt=first.negative_prompt,
        height=first.height,
        width=first.width,
        scheduler=first.scheduler,
        edit=edit,
        on_step=on_step,
        preview_at=generate.preview_steps(first.steps_run, first.partial_images),
        on_preview=previews if on_preview is not None else None,
    )
    outputs, start = [], 0
    latents = samples.latents.numpy().astype(np.float32)
    for r in requests:
        part = slice(start, start + r.n)
        images = [
            encode_image(
                img,
                r.output_format,
                r.output_compression,
                None
                if loaded.made_by is None
                else image_parameters(r, i, loaded.made_by, loaded.adapters),
            )
            for i, img in enumerate(samples.images[part])
        ]
        outputs.append(Output(images, latents[part]))
        start += r.n
    return outputs


def warm_up(loaded: Loaded, spec: ModelSpec, variant: str, compiled: bool) -> None:
    """Run the pipeline before the worker takes jobs. Eager: one image at the first size.
    Compiled: every path a request can take, so that no job waits for the compiler: each size
    at two batches with guidance (the batch then compiles dynamic), one image without guidance
    where the model's range allows it (a batch of one is compiled on its own), and at the
    first size a job with previews and an edit (with a mask where the model inpaints)."""
    first = spec.sizes[0]

    def request(size: str, **fields) -> JobRequest:
        width, height = astuple(parse_size(size))
        base = {
            "model": spec.name,
            "variant": variant,
            "prompt": next(iter(spec.labels), "a"),
            "n": 1,
            "width": width,
            "height": height,
            "steps": 2,
            "guidance_scale": spec.guidance,
            "seed": 0,
            "class_id": next(iter(spec.labels.values()), None),
        }
        return JobRequest(**{**base, **fields})

    def run(job: JobRequest, **inputs) -> None:
        previews = (lambda *_: None) if job.partial_images else None
        run_batch(loaded, spec, [job], lambda *_: None, on_preview=previews, **inputs)

    if not compiled:
        run(request(first))
        return
    low, high = spec.guidance_range
    guided = spec.guidance if spec.guidance > 1.0 else high  # > 1: the batch doubles
    for size in spec.sizes:
        if guided > 1.0:
            for n in (1, 2):
                run(request(size, n=n, guidance_scale=guided))
        if low <= 1.0:
            run(request(size, guidance_scale=1.0))
    if spec.previews:
        run(request(first, partial_images=1))
    if spec.edits:
        width, height = astuple(parse_size(first))
        image = encode_image(np.full((height, width, 3), 128, np.uint8), "png")
        run(request(first, image="warm-up", strength=0.5), image=image)
        if spec.inpainting:
            mask = encode_image(np.full((height, width, 3), 255, np.uint8), "png")
            job = request(first, image="warm-up", mask="warm-up", strength=0.5)
            run(job, image=image, mask=mask)


def _edit(image: bytes, mask: bytes | None, strength: float) -> generate.Edit:
    """An edit's inputs as the pipelines take them (app.uploads made them: RGB and L PNGs)."""
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    paint = None if mask is None else np.asarray(Image.open(io.BytesIO(mask)).convert("L")) > 127
    return generate.Edit(pixels, strength, paint)


def encode_image(
    pixels: np.ndarray,
    output_format: str,
    compression: int | None = None,
    parameters: dict | None = None,
) -> bytes:
    """PNG (lossless), or JPEG / WebP at encoder quality ``compression`` (PIL's default if
    None); ``parameters`` written into the file (app.provenance)."""
    buffer = io.BytesIO()
    options = save_options(output_format, parameters)
    if compression is not None:
        options["quality"] = compression
    Image.fromarray(pixels).convert("RGB").save(
        buffer, format=PIL_FORMATS[output_format], **options
    )
    return buffer.getvalue()


def reset_peak_memory(device: str) -> None:
    """Start a job's memory peak: CUDA's allocator peak on GPU, the RSS high-water mark on CPU."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: str) -> tuple[str, int]:
    """("cuda" | "rss", bytes) since the last ``reset_peak_memory``."""
    if device.startswith("cuda"):
        return "cuda", int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return "rss", int(line.split()[1]) * 1024
    except OSError:
        pass
    return "rss", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def pick_device(spec: ModelSpec, override: str | None) -> str:
    """The settings' device when set, else the registry's; an error if CUDA is missing."""
    device = override or spec.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{spec.name} is configured for {device} but CUDA is not available")
    return device
