"""Liveness, readiness and the API process's Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import metrics
from app.api.deps import QueueDep, RegistryDep
from app.errors import Unavailable

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(registry: RegistryDep, queue: QueueDep) -> dict:
    """Redis answers and every configured model has at least one live worker."""
    try:
        await queue.redis.ping()
    except Exception as exc:
        raise Unavailable(
            f"Redis does not answer: {type(exc).__name__}", code="redis_down"
        ) from exc
    workers = {}
    for spec in registry.models.values():
        workers[spec.name] = {v: await queue.live_workers(spec.name, v) for v in spec.variants}
    missing = [m for m, counts in workers.items() if sum(counts.values()) == 0]
    if missing:
        raise Unavailable(f"no live worker for {', '.join(missing)}", code="no_workers")
    return {"status": "ready", "workers": workers}


@router.get("/metrics")
async def prometheus_metrics(registry: RegistryDep, queue: QueueDep) -> Response:
    """Queue depths and live workers are read from Redis at each scrape."""
    try:
        for spec in registry.models.values():
            for v in spec.variants:
                metrics.QUEUE_DEPTH.labels(spec.name, v).set(await queue.depth(spec.name, v))
                metrics.WORKERS_LIVE.labels(spec.name, v).set(
                    await queue.live_workers(spec.name, v)
                )
    except Exception:  # without Redis the other metrics still answer
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
