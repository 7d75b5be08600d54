"""``POST /v1/images/generations`` and ``POST /v1/images/edits``: the OpenAI Images calls,
answered once the job is done, or with ``stream=true`` as OpenAI's Server-Sent Events
(``image_generation.partial_image`` ... ``image_generation.completed``; ``image_edit.*`` for
edits), which the official client's stream reads unchanged."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.datastructures import FormData, UploadFile

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
from app.config import Settings
from app.errors import ConflictError, InvalidRequest, JobFailed, Timeout, error_body
from app.queue.client import JobQueue
from app.queue.records import TERMINAL, Job, JobStatus
from app.schemas import EditRequest, GenerationRequest, ImageData, ImagesResponse
from app.sizes import Size
from app.submission import submit

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/images", tags=["images"])

MAX_FORM_FIELDS = 64


@router.post(
    "/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={200: {"content": {"text/event-stream": {}}, "description": "stream=true: SSE"}},
)
async def create_images(
    body: GenerationRequest,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
    views: ViewsDep,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
):
    submitted = await submit(
        settings, registry, queue, body, owner=owner, idempotency_key=idempotency_key
    )
    return await _answer(body, submitted.id, views, settings, queue, "image_generation")


def _edit_form_schema() -> dict:
    schema = EditRequest.model_json_schema()
    properties = {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "PNG with alpha, the image's size: transparent = edit",
        },
        **schema["properties"],
    }
    return {
        "type": "object",
        "properties": properties,
        "required": ["image", *schema.get("required", [])],
        "additionalProperties": False,
    }


@router.post(
    "/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={200: {"content": {"text/event-stream": {}}, "description": "stream=true: SSE"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _edit_form_schema()}},
        }
    },
)
async def edit_images(
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
    views: ViewsDep,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
):
    """Image-to-image (no mask) or inpainting (a mask whose transparent pixels are painted
    anew), as ``client.images.edit`` sends it: multipart/form-data with the file `image` (or
    one `image[]`), an optional file `mask`, and the fields of EditRequest."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send multipart/form-data (image, mask and fields)", param="image")
    async with request.form(max_files=3, max_fields=MAX_FORM_FIELDS) as form:
        image, mask, fields = await _read_form(form)
    try:
        body = EditRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
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
    return await _answer(body, submitted.id, views, settings, queue, "image_edit")


async def _read_form(form: FormData) -> tuple[bytes, bytes | None, dict]:
    files: dict[str, list[UploadFile]] = {}
    fields: dict[str, object] = {}
    lora: dict[str, list[str]] = {"name": [], "scale": []}  # lora[][name], lora[][scale]
    for key, value in form.multi_items():
        if isinstance(value, str) and key in ("lora[][name]", "lora[][scale]"):
            lora[key[7:-1]].append(value)
        elif isinstance(value, str):
            if key in fields or key in ("image", "image[]", "mask"):
                raise InvalidRequest(f"{key} is given more than once or is not a file", param=key)
            fields[key] = value
        elif key in ("image", "image[]", "mask"):
            files.setdefault("mask" if key == "mask" else "image", []).append(value)
        else:
            raise InvalidRequest(f"{key} is a file; only image and mask are", param=key)
    images, masks = files.get("image", []), files.get("mask", [])
    if len(images) != 1:
        raise InvalidRequest(
            f"send one image to edit (got {len(images)}); these models take one", param="image"
        )
    if len(masks) > 1:
        raise InvalidRequest("send at most one mask", param="mask")
    if lora["name"] or lora["scale"]:
        if "lora" in fields:
            raise InvalidRequest("send lora once: as JSON or as lora[][name]", param="lora")
        fields["lora"] = _form_lora(lora["name"], lora["scale"])
    elif isinstance(fields.get("lora"), str):
        fields["lora"] = _json_field("lora", str(fields["lora"]))
    image = await images[0].read()
    mask = await masks[0].read() if masks else None
    return image, mask, fields


def _form_lora(names: list[str], scales: list[str]) -> list[dict]:
    """``lora`` as the official client sends a list in a form: ``lora[][name]`` and
    ``lora[][scale]`` repeated, paired in order; so either every adapter has its scale or
    none has (each then gets its default)."""
    if scales and len(scales) != len(names):
        raise InvalidRequest(
            f"lora: {len(names)} names and {len(scales)} scales; in a form give every "
            "adapter its scale, or none, or send lora as one JSON field",
            param="lora",
        )
    if not scales:
        return [{"name": n} for n in names]
    return [{"name": n, "scale": s} for n, s in zip(names, scales, strict=True)]


def _json_field(name: str, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{name} is not valid JSON: {exc}", param=name) from None


async def _answer(
    body: GenerationRequest | EditRequest,
    job_id: str,
    views: Views,
    settings: Settings,
    queue: JobQueue,
    kind: str,
):
    if body.stream:
        return StreamingResponse(
            _events(queue, job_id, body, kind, settings.generation_timeout_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    job = await queue.wait(job_id, settings.generation_timeout_s)
    if job is None:
        raise Timeout(
            f"job {job_id} did not finish within {settings.generation_timeout_s:g} s; "
            f"it goes on: follow it at /v1/jobs/{job_id}",
            # the job is still running: a client retry would only queue a duplicate
            headers={"x-should-retry": "false"},
        )
    _raise_unless_completed(job)
    data = []
    for k in range(job.images):
        if body.response_format == "url":
            data.append(ImageData(url=views.image_url(job.id, k)))
            continue
        raw = await queue.image(job.id, k)
        if raw is None:
            raise InvalidRequest(f"the images of job {job.id} have expired", param="id")
        data.append(ImageData(b64_json=base64.b64encode(raw).decode()))
    return views.images(job, data)


def _raise_unless_completed(job: Job) -> None:
    if job.status == JobStatus.CANCELLED:
        raise ConflictError(f"job {job.id} was cancelled", code="cancelled")
    if job.status == JobStatus.FAILED:
        raise JobFailed(f"job {job.id} failed: {job.error}", code=job.error_code or "job_failed")


async def _events(
    queue: JobQueue, job_id: str, body: GenerationRequest | EditRequest, kind: str, timeout_s: float
) -> AsyncIterator[str]:
    """OpenAI's image stream: one ``{kind}.partial_image`` per preview as the worker makes it,
    then ``{kind}.completed`` with the image; a failure, cancellation or the generation
    timeout ends it with an ``error`` event (the official client raises it as an APIError)."""
    deadline = time.monotonic() + timeout_s
    common = {
        "background": body.background,
        "output_format": body.output_format,
        "quality": body.quality,
        "size": body.size or "auto",
    }
    async with queue.follow(job_id, "0-0") as events:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                yield _error(f"job {job_id} did not finish within {timeout_s:g} s", "timeout")
                return
            batch = await events.next(min(KEEPALIVE_S, left))
            if not batch:
                if await job_gone(queue, job_id):
                    yield _error(f"job {job_id} has expired", "not_found")
                    return
                yield ": keep-alive\n\n"
                continue
            for _, data in batch:
                if data.get("type") == "preview":
                    try:
                        raw = await queue.preview(job_id, int(data["index"]))
                    except RedisError as exc:  # a preview is a courtesy; the image is not
                        log.warning("cannot read a preview of %s: %s", job_id, exc)
                        raw = None
                    if raw is not None:
                        yield _sse(
                            f"{kind}.partial_image",
                            b64_json=base64.b64encode(raw).decode(),
                            partial_image_index=int(data["index"]),
                            created_at=int(time.time()),
                            **common,
                        )
                elif data.get("type") == "status" and data.get("status") in TERMINAL:
                    yield await _final(queue, job_id, kind, common)
                    return


async def _final(queue: JobQueue, job_id: str, kind: str, common: dict) -> str:
    job = await queue.get(job_id)
    if job is None:
        return _error(f"job {job_id} has expired", "not_found")
    try:
        _raise_unless_completed(job)
    except (ConflictError, JobFailed) as exc:
        return _error(exc.message, exc.code)
    raw = await queue.image(job_id, 0)
    if raw is None:
        return _error(f"the image of job {job_id} has expired", "not_found")
    size = str(Size(job.request.width, job.request.height))
    return _sse(
        f"{kind}.completed",
        b64_json=base64.b64encode(raw).decode(),
        created_at=int(job.finished_at or time.time()),
        id=job.id,
        seed=job.request.seed,
        **{**common, "size": size},
    )


def _sse(event: str, **data) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"


def _error(message: str, code: str | None) -> str:
    body = error_body(message, "server_error", None, code)
    return f"event: error\ndata: {json.dumps(body)}\n\n"
