"""Side-by-side comparisons of a model's variants (see ``app.comparison``).

``POST /v1/compare`` waits for the result; ``POST /v1/comparisons`` answers 202 at once with
the id and the jobs (follow each job's events for progress) and ``GET /v1/comparisons/{id}``
gives the result as far as it has come (the playground uses these two).
"""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from app.api.deps import Owner, QueueDep, RegistryDep, SettingsDep
from app.api.jobs import image_url, preview_url
from app.comparison import Comparison, collect, compare, submit
from app.errors import NotFound
from app.provenance import read_parameters
from app.queue.records import ANONYMOUS, is_id
from app.resolve import model_spec
from app.schemas import CompareRequest, CompareResponse, CompareVariant
from app.uploads import decode_base64

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["compare"])


def _arguments(body: CompareRequest, registry, owner: str) -> dict:
    return {
        "spec": model_spec(registry, body.model),
        "prompt": body.prompt,
        "variants": body.variants,
        "reference": body.reference,
        "seed": body.seed,
        "steps": body.steps,
        "guidance_scale": body.guidance_scale,
        "size": body.size,
        "negative_prompt": body.negative_prompt,
        "scheduler": body.scheduler,
        "partial_images": body.partial_images,
        "image": None if body.image is None else decode_base64(body.image, "image"),
        "mask": None if body.mask is None else decode_base64(body.mask, "mask"),
        "strength": body.strength,
        "owner": owner,
    }


@router.post("/compare", response_model=CompareResponse)
async def compare_variants(
    body: CompareRequest,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
) -> CompareResponse:
    result = await compare(settings, registry, queue, **_arguments(body, registry, owner))
    return _response(request, result)


@router.post("/comparisons", status_code=202, response_model=CompareResponse)
async def start_comparison(
    body: CompareRequest,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
) -> CompareResponse:
    result = await submit(settings, registry, queue, **_arguments(body, registry, owner))
    return _response(request, await collect(queue, result, 0))


@router.get("/comparisons/{comparison_id}", response_model=CompareResponse)
async def read_comparison(
    comparison_id: str, request: Request, queue: QueueDep, owner: Owner
) -> CompareResponse:
    record = await queue.comparison(comparison_id) if is_id(comparison_id) else None
    if record is None or record.get("owner", ANONYMOUS) != owner:
        raise NotFound(f"no comparison {comparison_id!r} (unknown, or expired)", param="id")
    result = await collect(queue, Comparison.from_record(record), 0)
    return _response(request, result)


def _response(request: Request, result: Comparison) -> CompareResponse:
    rows = []
    for row in result.rows:
        job = row.job
        measured = job.result if job else {}
        rows.append(
            CompareVariant(
                variant=row.variant,
                quantized=row.quantized,
                job_id=row.job_id,
                status=job.status.value if job else "expired",
                progress=job.progress if job else 0,
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
                error=job.error if job else "the job has expired",
                parameters=read_parameters(row.png) if row.png else None,
                previews=[preview_url(request, row.job_id, k) for k in range(job.previews)]
                if job
                else [],
            )
        )
    return CompareResponse(
        id=result.id,
        status="completed" if result.finished else "in_progress",
        model=result.model,
        prompt=result.prompt,
        seed=result.seed,
        reference=result.reference,
        variants=rows,
    )
