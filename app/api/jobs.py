"""Async jobs: submit, look up, follow (SSE, resumable), cancel, fetch images."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse

from app import metrics
from app.api.deps import (
    KEEPALIVE_S,
    Owner,
    QueueDep,
    RegistryDep,
    SettingsDep,
    Views,
    ViewsDep,
    job_gone,
)
from app.errors import ConflictError, InvalidRequest, NotFound
from app.queue.client import JobQueue
from app.queue.listener import stream_id
from app.queue.records import CONTENT_TYPES, TERMINAL, Job, is_id
from app.schemas import JobCreated, JobSubmission, JobView
from app.submission import submit
from app.uploads import decode_base64

__all__ = ["router"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def _get_job(queue: JobQueue, job_id: str, owner: str) -> Job:
    """The job, if it exists and belongs to ``owner``; 404 alike for all else, so other keys
    cannot even learn that an id exists."""
    job = await queue.get(job_id) if is_id(job_id) else None
    if job is None or job.owner != owner:
        raise NotFound(f"no job {job_id!r} (unknown, or expired)", param="id")
    return job


@router.post("", status_code=202, response_model=JobCreated)
async def create_job(
    body: JobSubmission,
    response: Response,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
    views: ViewsDep,
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
    submitted = await submit(
        settings,
        registry,
        queue,
        body,
        owner=owner,
        idempotency_key=idempotency_key,
        image=image,
        mask=mask,
    )
    job = await _get_job(queue, submitted.id, owner)
    response.headers["Location"] = views.url("read_job", job_id=submitted.id)
    return views.created(job, submitted.position)


@router.get("/{job_id}", response_model=JobView)
async def read_job(job_id: str, queue: QueueDep, owner: Owner, views: ViewsDep) -> JobView:
    job = await _get_job(queue, job_id, owner)
    return views.job(job, await queue.position(job))


@router.post("/{job_id}/cancel", response_model=JobView)
async def cancel_job(job_id: str, queue: QueueDep, owner: Owner, views: ViewsDep) -> JobView:
    """Cancel a queued job at once, a running one at its next step; cancelling again is a
    no-op (and counted once)."""
    job = await _get_job(queue, job_id, owner)
    outcome = await queue.cancel(job)
    if outcome in ("already_completed", "already_failed"):
        status = outcome.removeprefix("already_")
        raise ConflictError(f"job {job_id} has already {status}; nothing to cancel", param="id")
    if outcome == "cancelled":
        metrics.JOBS.labels(job.request.model, job.request.variant, "cancelled").inc()
    job = await _get_job(queue, job_id, owner)
    return views.job(job, await queue.position(job))


@router.get("/{job_id}/images/{index}", name="job_image")
async def job_image(job_id: str, index: int, queue: QueueDep, owner: Owner) -> Response:
    job = await _get_job(queue, job_id, owner)
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
    job = await _get_job(queue, job_id, owner)
    valid = 0 <= index < job.previews and 0 <= image < job.request.n
    data = await queue.preview(job_id, index, image) if valid else None
    if data is None:
        raise NotFound(f"job {job_id} has no preview {index} of image {image}", param="index")
    return Response(data, media_type=CONTENT_TYPES[job.request.output_format])


@router.get("/{job_id}/events")
async def job_events(
    job_id: str,
    queue: QueueDep,
    owner: Owner,
    views: ViewsDep,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    """Server-Sent Events: the job's status changes, one event per denoising step and one per
    preview (with its URL), each with its id; reconnecting with ``Last-Event-ID`` resumes after
    that event. A comment at least every 15 s keeps an idle connection open however long the
    job takes."""
    job = await _get_job(queue, job_id, owner)
    after = last_event_id.strip() if last_event_id is not None else "0-0"
    if stream_id(after) is None:
        raise InvalidRequest(
            "Last-Event-ID is not an event id of this job (ms-seq)", param="Last-Event-ID"
        )
    return StreamingResponse(
        _stream(queue, job.id, after, job.status in TERMINAL, views),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(event_id: str, data: dict, views: Views, job_id: str) -> tuple[str, bool]:
    """One SSE message, and whether it is the job's last."""
    kind = data.pop("type", "message")
    for key in ("progress", "step", "steps", "index", "images"):
        if key in data:
            data[key] = int(data[key])
    if kind == "preview":
        data["url"] = views.preview_url(job_id, data["index"])
    last = kind == "status" and data.get("status") in {s.value for s in TERMINAL}
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n", last


async def _stream(
    queue: JobQueue, job_id: str, after: str, finished: bool, views: Views
) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    while finished:  # everything there is to send is in the stream already
        replayed = await queue.replay(job_id, after)
        if not replayed:
            return
        for event_id, data in replayed:
            after = event_id
            yield _event(event_id, data, views, job_id)[0]
    async with queue.follow(job_id, after) as events:
        while True:
            batch = await events.next(KEEPALIVE_S)
            if not batch:
                if await job_gone(queue, job_id):
                    return
                yield ": keep-alive\n\n"
                continue
            for event_id, data in batch:
                message, last = _event(event_id, data, views, job_id)
                yield message
                if last:
                    return
