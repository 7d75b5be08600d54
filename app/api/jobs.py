"""Async jobs: submit, look up, follow (SSE, resumable), cancel, fetch images."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.api.deps import Owner, QueueDep, RegistryDep, SettingsDep, check_rate, check_workers
from app.config import Settings
from app.errors import ConflictError, InvalidRequest, NotFound
from app.queue.client import JobQueue, Submitted
from app.queue.listener import stream_id
from app.queue.records import CONTENT_TYPES, TERMINAL, Job, is_id
from app.resolve import edit_inputs, job_request
from app.schemas import EditRequest, GenerationRequest, JobCreated, JobSubmission, JobView
from app.uploads import decode_base64

__all__ = [
    "KEEPALIVE_S",
    "get_job",
    "job_gone",
    "job_view",
    "preview_url",
    "public_url",
    "router",
    "submit",
]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

KEEPALIVE_S = 15.0  # an SSE comment at least this often keeps proxies and clients from timing out


async def submit(
    body: GenerationRequest | EditRequest | JobSubmission,
    settings,
    registry,
    queue: JobQueue,
    owner: str,
    idempotency_key: str | None,
    image: bytes | None = None,
    mask: bytes | None = None,
) -> Submitted:
    """Check a request, store an edit's inputs, queue the job."""
    if getattr(body, "input_fidelity", None) is not None:
        raise InvalidRequest(
            "input_fidelity is gpt-image's; here strength sets how much of the input stays "
            "(lower keeps more)",
            param="input_fidelity",
        )
    # decoding and resizing an image is CPU work: off the event loop
    inputs = (registry, body.model, body.size, image, mask)
    size, picture, shape = (
        await run_in_threadpool(edit_inputs, *inputs) if image else edit_inputs(*inputs)
    )
    request = job_request(
        settings,
        registry,
        model=body.model,
        prompt=body.prompt,
        variant=body.variant,
        n=body.n,
        size=size,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        negative_prompt=body.negative_prompt,
        output_format=body.output_format,
        output_compression=body.output_compression,
        quality=body.quality,
        background=body.background,
        moderation=getattr(body, "moderation", None),
        style=getattr(body, "style", None),
        scheduler=body.scheduler,
        partial_images=body.partial_images,
        stream=body.stream,
        image=picture,
        mask=shape,
        strength=getattr(body, "strength", None),
    )
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 256:
        raise InvalidRequest("Idempotency-Key must be 1 to 256 characters", param="Idempotency-Key")
    await check_workers(registry, queue, [request])
    await check_rate(queue, settings, owner)
    await queue.store_uploads(picture, shape)
    return await queue.submit(request, idempotency=idempotency_key, owner=owner)


async def get_job(queue: JobQueue, job_id: str, owner: str) -> Job:
    """The job, if it exists and belongs to ``owner``; 404 alike for all else, so other keys
    cannot even learn that an id exists."""
    job = await queue.get(job_id) if is_id(job_id) else None
    if job is None or job.owner != owner:
        raise NotFound(f"no job {job_id!r} (unknown, or expired)", param="id")
    return job


def public_url(request: Request, name: str, **params) -> str:
    """A route's URL: under ``T2I_PUBLIC_URL`` when set, else a path; never from ``Host``."""
    path = request.app.url_path_for(name, **params)
    settings: Settings = request.app.state.settings
    return f"{settings.public_url}{path}" if settings.public_url else str(path)


def image_url(request: Request, job_id: str, index: int) -> str:
    return public_url(request, "job_image", job_id=job_id, index=index)


def preview_url(request: Request, job_id: str, index: int) -> str:
    return public_url(request, "job_preview", job_id=job_id, index=index)


async def job_view(request: Request, queue: JobQueue, job: Job) -> JobView:
    error = {"message": job.error, "code": job.error_code} if job.error else None
    return JobView(
        id=job.id,
        status=job.status.value,
        progress=job.progress,
        step=job.step,
        steps=job.request.steps_run,
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
        previews=[preview_url(request, job.id, k) for k in range(job.previews)],
        result=job.result,
    )


@router.post("", status_code=202, response_model=JobCreated)
async def create_job(
    body: JobSubmission,
    response: Response,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
) -> JobCreated:
    """Queue a generation, or an edit when `image` is given; follow it at /v1/jobs/{id}/events
    (with `partial_images`, its previews too)."""
    if body.stream:
        raise InvalidRequest(
            "a job is followed at /v1/jobs/{id}/events; stream applies to /v1/images/*",
            param="stream",
        )
    image = None if body.image is None else decode_base64(body.image, "image")
    mask = None if body.mask is None else decode_base64(body.mask, "mask")
    submitted = await submit(body, settings, registry, queue, owner, idempotency_key, image, mask)
    job = await get_job(queue, submitted.id, owner)
    response.headers["Location"] = public_url(request, "read_job", job_id=submitted.id)
    return JobCreated(
        id=job.id,
        status=job.status.value,
        position=submitted.position,
        model=job.request.model,
        variant=job.request.variant,
    )


@router.get("/{job_id}", response_model=JobView)
async def read_job(job_id: str, request: Request, queue: QueueDep, owner: Owner) -> JobView:
    return await job_view(request, queue, await get_job(queue, job_id, owner))


@router.post("/{job_id}/cancel", response_model=JobView)
async def cancel_job(job_id: str, request: Request, queue: QueueDep, owner: Owner) -> JobView:
    """Cancel a queued job at once, a running one at its next step; cancelling again is a
    no-op (and counted once)."""
    job = await get_job(queue, job_id, owner)
    outcome = await queue.cancel(job)
    if outcome in ("already_completed", "already_failed"):
        status = outcome.removeprefix("already_")
        raise ConflictError(f"job {job_id} has already {status}; nothing to cancel", param="id")
    if outcome == "cancelled":
        metrics.JOBS.labels(job.request.model, job.request.variant, "cancelled").inc()
    return await job_view(request, queue, await get_job(queue, job_id, owner))


@router.get("/{job_id}/images/{index}", name="job_image")
async def job_image(job_id: str, index: int, queue: QueueDep, owner: Owner) -> Response:
    job = await get_job(queue, job_id, owner)
    data = await queue.image(job_id, index) if 0 <= index < job.images else None
    if data is None:
        raise NotFound(f"job {job_id} has no image {index}", param="index")
    return Response(data, media_type=CONTENT_TYPES[job.request.output_format])


@router.get("/{job_id}/previews/{index}", name="job_preview")
async def job_preview(
    job_id: str, index: int, queue: QueueDep, owner: Owner, image: int = 0
) -> Response:
    """Preview ``index`` of the job's image ``image`` (the decoded prediction of the clean
    image at one step), once its event has been sent."""
    job = await get_job(queue, job_id, owner)
    valid = 0 <= index < job.previews and 0 <= image < job.request.n
    data = await queue.preview(job_id, index, image) if valid else None
    if data is None:
        raise NotFound(f"job {job_id} has no preview {index} of image {image}", param="index")
    return Response(data, media_type=CONTENT_TYPES[job.request.output_format])


@router.get("/{job_id}/events")
async def job_events(
    job_id: str,
    request: Request,
    queue: QueueDep,
    owner: Owner,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    """Server-Sent Events: the job's status changes, one event per denoising step and one per
    preview (with its URL), each with its id; reconnecting with ``Last-Event-ID`` resumes after
    that event. A comment at least every 15 s keeps an idle connection open however long the
    job takes."""
    job = await get_job(queue, job_id, owner)
    after = last_event_id.strip() if last_event_id is not None else "0-0"
    if stream_id(after) is None:
        raise InvalidRequest(
            "Last-Event-ID is not an event id of this job (ms-seq)", param="Last-Event-ID"
        )
    return StreamingResponse(
        _stream(queue, job.id, after, job.status in TERMINAL, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(event_id: str, data: dict, request: Request, job_id: str) -> tuple[str, bool]:
    """One SSE message, and whether it is the job's last."""
    kind = data.pop("type", "message")
    for key in ("progress", "step", "steps", "index", "images"):
        if key in data:
            data[key] = int(data[key])
    if kind == "preview":
        data["url"] = preview_url(request, job_id, data["index"])
    last = kind == "status" and data.get("status") in {s.value for s in TERMINAL}
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n", last


async def _stream(
    queue: JobQueue, job_id: str, after: str, finished: bool, request: Request
) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    while finished:  # everything there is to send is in the stream already
        replayed = await queue.replay(job_id, after)
        if not replayed:
            return
        for event_id, data in replayed:
            after = event_id
            yield _event(event_id, data, request, job_id)[0]
    async with queue.follow(job_id, after) as events:
        while True:
            batch = await events.next(KEEPALIVE_S)
            if not batch:
                if await job_gone(queue, job_id):
                    return
                yield ": keep-alive\n\n"
                continue
            for event_id, data in batch:
                message, last = _event(event_id, data, request, job_id)
                yield message
                if last:
                    return


async def job_gone(queue: JobQueue, job_id: str) -> bool:
    """The job's record has expired (a stalled Redis does not end the stream)."""
    try:
        return await queue.get(job_id) is None
    except RedisError as exc:
        log.warning("cannot read job %s while streaming: %s", job_id, exc)
        return False
