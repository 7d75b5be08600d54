"""``POST /v1/compare``: one prompt and seed through several variants of a model, side by side
(see ``app.comparison``)."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from app.api.deps import Caller, QueueDep, RegistryDep, SettingsDep
from app.api.jobs import image_url
from app.comparison import compare
from app.resolve import model_spec
from app.schemas import CompareRequest, CompareResponse, CompareVariant

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["compare"])


@router.post("/compare", response_model=CompareResponse)
async def compare_variants(
    body: CompareRequest,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Caller,
) -> CompareResponse:
    result = await compare(
        settings,
        registry,
        queue,
        model_spec(registry, body.model),
        prompt=body.prompt,
        variants=body.variants,
        reference=body.reference,
        seed=body.seed,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        size=body.size,
        owner=owner,
    )
    rows = []
    for row in result.rows:
        job = row.job
        measured = job.result if job else {}
        rows.append(
            CompareVariant(
                variant=row.variant,
                quantized=row.quantized,
                job_id=row.job_id,
                status=job.status.value if job else "in_progress",
                b64_png=base64.b64encode(row.png).decode() if row.png else None,
                url=image_url(request, row.job_id, 0) if row.png else None,
                latency_s=job.timings["total_s"] if job else None,
                inference_s=measured.get("inference_s"),
                step_ms_median=measured.get("step_ms_median"),
                peak_memory_bytes=measured.get("peak_memory_bytes"),
                denoiser_weight_bytes=measured.get("denoiser_weight_bytes"),
                psnr_db=row.psnr_db,
                ssim=row.ssim,
                sqnr_latent_db=row.sqnr_latent_db,
                error=(job.error if job else "did not finish within the generation timeout"),
            )
        )
    return CompareResponse(
        model=result.model,
        prompt=result.prompt,
        seed=result.seed,
        reference=result.reference,
        variants=rows,
    )
