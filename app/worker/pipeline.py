"""Load one registry variant as a diffusers pipeline and run a batch of jobs through it."""

from __future__ import annotations

import io
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.provenance import image_parameters, save_options
from app.queue.records import JobRequest
from app.registry import CLASS_CONDITIONAL, ModelSpec, VariantSpec
from pipelines import generate
from pipelines.loader import compile_denoiser, load_pipeline

__all__ = [
    "Loaded",
    "Output",
    "encode_image",
    "load",
    "peak_memory",
    "pick_device",
    "reset_peak_memory",
    "run_batch",
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


@dataclass
class Output:
    images: list[bytes]
    latents: np.ndarray  # float32 (n, C, h, w)


def load(
    spec: ModelSpec,
    variant: VariantSpec,
    device: str,
    metadata: bool = True,
    compile_cache: str | None = None,
) -> Loaded:
    """The pipeline of a variant on ``device``: full precision or a quantized artifact, its
    denoiser ``torch.compile``d when the variant says so (compiled at the worker's warm-up;
    ``compile_cache`` keeps the generated code, so a restarted worker reuses it).
    ``metadata``: its images carry their parameters and what made them."""
    t0 = time.perf_counter()
    if variant.compile and compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
    if variant.quantized:
        from quantization.artifact import load_quantized

        # the very call a user makes to run the artifact as served
        pipe = load_quantized(variant.artifact, device=device, compile=variant.compile)
        weight_bytes = int(variant.manifest.get("sizes", {}).get("denoiser_weight_bytes", 0))
    else:
        pipe = load_pipeline(spec.source, torch_dtype=TORCH_DTYPES[variant.dtype])
        denoiser = getattr(pipe, "transformer", None) or pipe.unet
        weight_bytes = sum(p.numel() * p.element_size() for p in denoiser.parameters())
        pipe.to(device)
        if variant.compile:
            compile_denoiser(pipe)
    pipe.set_progress_bar_config(disable=True)
    made_by = _made_by(spec, variant, pipe) if metadata else None
    return Loaded(pipe, device, weight_bytes, time.perf_counter() - t0, made_by)


def _made_by(spec: ModelSpec, variant: VariantSpec, pipe) -> dict:
    """Model, variant and scheduler; for an artifact its recipe and the sha256 of its manifest
    (which holds the sha256 of every weight file, so it names the weights exactly)."""
    made_by = {
        "model": spec.name,
        "variant": variant.name,
        "dtype": variant.dtype,
        "scheduler": type(pipe.scheduler).__name__,
    }
    if variant.quantized:
        from quantization.artifact import sha256_of

        made_by["recipe"] = variant.manifest.get("recipe", {}).get("name")
        made_by["backend"] = variant.manifest.get("backend")
        made_by["artifact_sha256"] = sha256_of(Path(variant.artifact) / "manifest.json")
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
    conditions, seeds = [], []
    for r in requests:
        condition = r.class_id if spec.kind == CLASS_CONDITIONAL else r.prompt
        conditions += [condition] * r.n
        seeds += [r.seed + i for i in range(r.n)]

    def previews(k: int, step: int, pixels: np.ndarray) -> None:
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
        edit=None if image is None else _edit(image, mask, first.strength),
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
                None if loaded.made_by is None else image_parameters(r, i, loaded.made_by),
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
        width, height = (int(x) for x in size.split("x"))
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
    run(request(first, partial_images=1))
    if spec.edits:
        width, height = (int(x) for x in first.split("x"))
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
