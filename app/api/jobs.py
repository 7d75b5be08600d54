"""Async jobs: submit, look up, follow (SSE, resumable), cancel, fetch images."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from app import metrics
from app.api.deps import Caller, Owner, QueueDep, RegistryDep, SettingsDep
from app.errors import ConflictError, InvalidRequest, NotFound
from app.queue.client import JobQueue, Submitted
from app.queue.records import CONTENT_TYPES, TERMINAL, Job, JobStatus
from app.resolve import job_request
from app.schemas import GenerationRequest, JobCreated, JobView

__all__ = ["get_job", "image_url", "job_view", "router", "submit"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

KEEPALIVE_MS = 15_000


async def submit(
    body: GenerationRequest,
    settings,
    registry,
    queue: JobQueue,
    owner: str,
    idempotency_key: str | None,
) -> Submitted:
    request = job_request(
        settings,
        registry,
        model=body.model,
        prompt=body.prompt,
        variant=body.variant,
        n=body.n,
        size=body.size,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        negative_prompt=body.negative_prompt,
        output_format=body.output_format,
    )
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 256:
        raise InvalidRequest("Idempotency-Key must be 1 to 256 characters", param="Idempotency-Key")
    return await queue.submit(request, idempotency=idempotency_key, owner=owner)


async def get_job(queue: JobQueue, job_id: str) -> Job:
    job = await queue.get(job_id) if len(job_id) <= 64 else None
    if job is None:
        raise NotFound(f"no job {job_id!r} (unknown, or expired)", param="id")
    return job


def image_url(request: Request, job_id: str, index: int) -> str:
    return str(request.url_for("job_image", job_id=job_id, index=index))


async def job_view(request: Request, queue: JobQueue, job: Job) -> JobView:
    error = {"message": job.error, "code": job.error_code} if job.error else None
    return JobView(
        id=job.id,
        status=job.status.value,
        progress=job.progress,
        step=job.step,
        steps=job.request.steps,
        position=await queue.position(job),
        model=job.request.model,
        variant=job.request.variant,
        seed=job.request.seed,
        created=job.created_at,
        timings=job.timings,
        deliveries=job.deliveries,
        worker=job.worker,
        cancel_requested=job.cancel_requested,
        error=error,
        images=[image_url(request, job.id, k) for k in range(job.images)],
        result=job.result,
    )


@router.post("", status_code=202, response_model=JobCreated)
async def create_job(
    body: GenerationRequest,
    response: Response,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Caller,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
) -> JobCreated:
    submitted = await submit(body, settings, registry, queue, owner, idempotency_key)
    job = await get_job(queue, submitted.id)
    response.headers["Location"] = str(request.url_for("read_job", job_id=submitted.id))
    return JobCreated(
        id=job.id,
        status=job.status.value,
        position=submitted.position,
        model=job.request.model,
        variant=job.request.variant,
    )


@router.get("/{job_id}", response_model=JobView)
async def read_job(job_id: str, request: Request, queue: QueueDep, _: Owner) -> JobView:
    return await job_view(request, queue, await get_job(queue, job_id))


@router.post("/{job_id}/cancel", response_model=JobView)
async def cancel_job(job_id: str, request: Request, queue: QueueDep, _: Owner) -> JobView:
    job = await get_job(queue, job_id)
    outcome = await queue.cancel(job)
    if outcome in (JobStatus.COMPLETED, JobStatus.FAILED):
        raise ConflictError(f"job {job_id} has already {outcome}; nothing to cancel", param="id")
    if outcome == "cancelled":
        metrics.JOBS.labels(job.request.model, job.request.variant, "cancelled").inc()
    return await job_view(request, queue, await get_job(queue, job_id))


@router.get("/{job_id}/images/{index}", name="job_image")
async def job_image(job_id: str, index: int, queue: QueueDep, _: Owner) -> Response:
    job = await get_job(queue, job_id)
    data = await queue.image(job_id, index) if 0 <= index < job.images else None
    if data is None:
        raise NotFound(f"job {job_id} has no image {index}", param="index")
    return Response(data, media_type=CONTENT_TYPES[job.request.output_format])


@router.get("/{job_id}/events")
async def job_events(
    job_id: str,
    queue: QueueDep,
    _: Owner,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    """Server-Sent Events: the job's status changes and one event per denoising step, each
    with its id; reconnecting with ``Last-Event-ID`` resumes after that event."""
    job = await get_job(queue, job_id)
    after = last_event_id or "0-0"
    if not _is_stream_id(after):
        raise InvalidRequest("Last-Event-ID is not an event id of this job", param="Last-Event-ID")
    return StreamingResponse(
        _stream(queue, job.id, after, job.status in TERMINAL),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(queue: JobQueue, job_id: str, after: str, finished: bool) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    while True:
        events = await queue.events(job_id, after, None if finished else KEEPALIVE_MS)
        if not events:
            if finished or await queue.get(job_id) is None:
                return
            yield ": keep-alive\n\n"
            continue
        for event_id, data in events:
            after = event_id
            kind = data.pop("type", "message")
            for key in ("progress", "step", "steps"):
                if key in data:
                    data[key] = int(data[key])
            yield f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            if kind == "status" and data.get("status") in {s.value for s in TERMINAL}:
                return


def _is_stream_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit() and len(value) <= 41
