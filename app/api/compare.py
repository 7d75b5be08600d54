"""Side-by-side comparisons of a model's variants (see ``app.comparison``).

``POST /v1/compare`` waits for the result; ``POST /v1/comparisons`` answers 202 at once with
the id and the jobs (follow each job's events for progress) and ``GET /v1/comparisons/{id}``
gives the result as far as it has come (the playground uses these two).
"""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import Owner, QueueDep, RegistryDep, SettingsDep, ViewsDep
from app.comparison import Comparison, collect, compare, start
from app.errors import NotFound
from app.queue.records import ANONYMOUS, is_id
from app.schemas import CompareRequest, CompareResponse

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["compare"])


@router.post("/compare", response_model=CompareResponse)
async def compare_variants(
    body: CompareRequest,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
    views: ViewsDep,
) -> CompareResponse:
    return views.comparison(await compare(settings, registry, queue, body, owner))


@router.post("/comparisons", status_code=202, response_model=CompareResponse)
async def start_comparison(
    body: CompareRequest,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    owner: Owner,
    views: ViewsDep,
) -> CompareResponse:
    result = await start(settings, registry, queue, body, owner)
    return views.comparison(await collect(queue, result, 0))


@router.get("/comparisons/{comparison_id}", response_model=CompareResponse)
async def read_comparison(
    comparison_id: str, queue: QueueDep, owner: Owner, views: ViewsDep
) -> CompareResponse:
    record = await queue.comparison(comparison_id) if is_id(comparison_id) else None
    if record is None or record.get("owner", ANONYMOUS) != owner:
        raise NotFound(f"no comparison {comparison_id!r} (unknown, or expired)", param="id")
    return views.comparison(await collect(queue, Comparison.from_record(record), 0))
