"""``POST /v1/images/generations``: the OpenAI Images call, answered once the job is done."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Header, Request

from app.api.deps import Owner, QueueDep, RegistryDep, SettingsDep
from app.api.jobs import image_url, submit
from app.errors import ConflictError, InvalidRequest, JobFailed, Timeout
from app.queue.records import JobStatus
from app.schemas import GenerationRequest, ImageData, ImagesResponse

__all__ = ["router"]

router = APIRouter(prefix="/v1/images", tags=["images"])


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def create_images(
    body: GenerationRequest,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
) -> ImagesResponse:
    submitted = await submit(body, settings, registry, queue, owner, idempotency_key)
    job = await queue.wait(submitted.id, settings.generation_timeout_s)
    if job is None:
        raise Timeout(
            f"job {submitted.id} did not finish within {settings.generation_timeout_s:g} s; "
            f"it goes on: follow it at /v1/jobs/{submitted.id}",
            # the job is still running: a client retry would only queue a duplicate
            headers={"x-should-retry": "false"},
        )
    if job.status == JobStatus.CANCELLED:
        raise ConflictError(f"job {job.id} was cancelled", code="cancelled")
    if job.status == JobStatus.FAILED:
        raise JobFailed(f"job {job.id} failed: {job.error}", code=job.error_code or "job_failed")
    data = []
    for k in range(job.images):
        if body.response_format == "url":
            data.append(ImageData(url=image_url(request, job.id, k)))
            continue
        raw = await queue.image(job.id, k)
        if raw is None:
            raise InvalidRequest(f"the images of job {job.id} have expired", param="id")
        data.append(ImageData(b64_json=base64.b64encode(raw).decode()))
    return ImagesResponse(
        created=int(job.finished_at or time.time()),
        data=data,
        id=job.id,
        model=job.request.model,
        variant=job.request.variant,
        seed=job.request.seed,
        steps=job.request.steps,
        guidance_scale=job.request.guidance_scale,
        output_format=job.request.output_format,
        timings={**job.timings, **{k: job.result.get(k) for k in ("step_ms_median",)}},
    )
