"""The one path from a request to queued jobs: resolve, prepare the uploads, check the
workers and the caller's rate, store the uploads, enqueue.

Generations, edits and jobs submit through ``submit``; comparisons, the shadow ones included,
through ``submit_variants`` (``app.comparison``). The routes only parse and answer.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.errors import InvalidRequest, RateLimited, Unavailable
from app.queue.client import JobQueue, Submitted
from app.queue.records import JobRequest
from app.registry import Registry
from app.resolve import EditInputs, edit_inputs
from app.schemas import CompareRequest, EditRequest, GenerationRequest, JobSubmission

__all__ = ["submit", "submit_variants"]

NO_WORKER_RETRY_S = 10  # Retry-After when a variant that requires a live worker has none


async def submit(
    settings: Settings,
    registry: Registry,
    queue: JobQueue,
    body: GenerationRequest | EditRequest | JobSubmission,
    *,
    owner: str,
    idempotency_key: str | None = None,
    image: bytes | None = None,
    mask: bytes | None = None,
) -> Submitted:
    """Queue the job of a generation, or of an edit of ``image`` (and ``mask``) as sent; the
    same ``idempotency_key`` of the same owner gives back the same job."""
    if isinstance(body, EditRequest) and body.input_fidelity is not None:
        raise InvalidRequest(
            "input_fidelity is gpt-image's; here strength sets how much of the input stays "
            "(lower keeps more)",
            param="input_fidelity",
        )
    edit = await _edit_inputs(registry, body.model, body.size, image, mask)
    request = body.to_job_request(settings, registry, edit)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 256:
        raise InvalidRequest("Idempotency-Key must be 1 to 256 characters", param="Idempotency-Key")
    submitted = await _enqueue(settings, registry, queue, [request], edit, owner, idempotency_key)
    return submitted[0]


async def submit_variants(
    settings: Settings,
    registry: Registry,
    queue: JobQueue,
    body: CompareRequest,
    variants: list[str],
    seed: int,
    *,
    owner: str,
    image: bytes | None = None,
    mask: bytes | None = None,
) -> list[Submitted]:
    """Queue a comparison's jobs, one per variant of ``variants``, all at ``seed``: all of
    them or none."""
    edit = await _edit_inputs(registry, body.model, body.size, image, mask)
    requests = body.to_job_requests(settings, registry, edit, variants, seed)
    return await _enqueue(settings, registry, queue, requests, edit, owner, None)


async def _edit_inputs(
    registry: Registry, model: str, size: str | None, image: bytes | None, mask: bytes | None
) -> EditInputs | None:
    if image is None:
        return edit_inputs(registry, model, size, image, mask)
    # decoding and resizing an image is CPU work: off the event loop
    return await run_in_threadpool(edit_inputs, registry, model, size, image, mask)


async def _enqueue(
    settings: Settings,
    registry: Registry,
    queue: JobQueue,
    requests: list[JobRequest],
    edit: EditInputs | None,
    owner: str,
    idempotency_key: str | None,
) -> list[Submitted]:
    await _check_workers(registry, queue, requests)
    await _check_rate(queue, settings, owner)
    if edit is not None:
        await queue.store_uploads(edit.image, edit.mask)
    return await queue.submit_all(requests, idempotency=idempotency_key, owner=owner)


async def _check_workers(registry: Registry, queue: JobQueue, requests: list[JobRequest]) -> None:
    """503 for a variant marked ``require_worker`` that has no live worker now; any other
    variant takes jobs with no worker and runs them when one starts (scale from zero)."""
    for r in requests:
        if not registry.models[r.model].variants[r.variant].require_worker:
            continue
        if await queue.live_workers(r.model, r.variant) == 0:
            raise Unavailable(
                f"{r.model}/{r.variant} has no live worker and does not queue without one",
                param="variant",
                code="no_workers",
                headers={"Retry-After": str(NO_WORKER_RETRY_S)},
            )


async def _check_rate(queue: JobQueue, settings: Settings, owner: str) -> None:
    """Count one valid submission of ``owner``; 429 past its per-minute budget. Called once a
    request has been validated, so refused requests do not use up the budget."""
    retry = await queue.rate_limit(owner, settings.rate_limit_per_minute)
    if retry is not None:
        raise RateLimited(
            f"more than {settings.rate_limit_per_minute} submissions this minute",
            headers={"Retry-After": str(retry)},
        )
