"""``POST /v1/compare``: one prompt and seed through several variants of a model, side by side.

Each variant runs as an ordinary job on its own workers; the answer has every image and, per
variant, latency, peak memory and fidelity against the reference (full-precision) image: PSNR
and SSIM of the images, SQNR of the final latents. The fidelity gauges follow the latest compare.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import secrets

import numpy as np
from fastapi import APIRouter, Request
from PIL import Image

from app import metrics
from app.api.deps import Caller, QueueDep, RegistryDep, SettingsDep
from app.api.jobs import image_url
from app.errors import InvalidRequest
from app.queue.records import Job, JobStatus
from app.resolve import job_request, model_spec, variant_name
from app.schemas import CompareRequest, CompareResponse, CompareVariant
from quality.metrics import psnr_db, sqnr_db, ssim

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["compare"])


@router.post("/compare", response_model=CompareResponse)
async def compare(
    body: CompareRequest,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Caller,
) -> CompareResponse:
    spec = model_spec(registry, body.model)
    names = body.variants or list(spec.variants)
    for name in names:
        variant_name(spec, name)
    if len(set(names)) != len(names):
        raise InvalidRequest("variants are listed twice", param="variants")
    if len(names) > settings.compare_max_variants:
        raise InvalidRequest(
            f"at most {settings.compare_max_variants} variants per compare", param="variants"
        )
    reference = body.reference or next(
        (v for v in names if not spec.variants[v].quantized), names[0]
    )
    if reference not in names:
        raise InvalidRequest(
            f"the reference {reference!r} is not among variants", param="reference"
        )
    seed = secrets.randbelow(2**31) if body.seed is None else body.seed
    requests = [
        job_request(
            settings,
            registry,
            model=body.model,
            prompt=body.prompt,
            variant=name,
            size=body.size,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            seed=seed,
        )
        for name in names
    ]
    submitted = [await queue.submit(r, owner=owner) for r in requests]
    jobs = await asyncio.gather(
        *(queue.wait(s.id, settings.generation_timeout_s) for s in submitted)
    )
    outputs = {}
    for name, s, job in zip(names, submitted, jobs, strict=True):
        outputs[name] = (s.id, job, *(await _image_and_latents(queue, job)))
    _, _, ref_image, ref_latents = outputs[reference]
    rows = []
    for name in names:
        job_id, job, image, latents = outputs[name]
        row = _row(request, spec.variants[name].quantized, name, job_id, job, image)
        if name != reference and image is not None and ref_image is not None:
            row.psnr_db = _finite(psnr_db(ref_image[None], image[None]))
            row.ssim = _finite(ssim(ref_image[None], image[None]))
            if (
                latents is not None
                and ref_latents is not None
                and latents.shape == ref_latents.shape
            ):
                row.sqnr_latent_db = _finite(sqnr_db(ref_latents, latents))
            labels = {"model": spec.name, "variant": name}
            for gauge, value in (
                (metrics.FIDELITY_PSNR, row.psnr_db),
                (metrics.FIDELITY_SSIM, row.ssim),
                (metrics.FIDELITY_SQNR, row.sqnr_latent_db),
            ):
                if value is not None:
                    gauge.labels(**labels).set(value)
        rows.append(row)
    return CompareResponse(
        model=spec.name, prompt=body.prompt, seed=seed, reference=reference, variants=rows
    )


async def _image_and_latents(queue, job: Job | None):
    if job is None or job.status != JobStatus.COMPLETED or job.images < 1:
        return None, None
    raw = await queue.image(job.id, 0)
    blob = await queue.latents(job.id)
    image = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")) if raw else None
    latents = np.frombuffer(blob, np.float32) if blob else None
    return image, latents


def _row(request: Request, quantized: bool, name: str, job_id: str, job: Job | None, image):
    if job is None:
        status, error = "in_progress", "did not finish within the generation timeout"
    else:
        status, error = job.status.value, job.error
    result = job.result if job else {}
    raw_png = None
    if image is not None:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        raw_png = base64.b64encode(buffer.getvalue()).decode()
    return CompareVariant(
        variant=name,
        quantized=quantized,
        job_id=job_id,
        status=status,
        b64_png=raw_png,
        url=image_url(request, job_id, 0) if image is not None else None,
        latency_s=job.timings["total_s"] if job else None,
        inference_s=result.get("inference_s"),
        step_ms_median=result.get("step_ms_median"),
        peak_memory_bytes=result.get("peak_memory_bytes"),
        denoiser_weight_bytes=result.get("denoiser_weight_bytes"),
        psnr_db=None,
        ssim=None,
        sqnr_latent_db=None,
        error=error,
    )


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None
