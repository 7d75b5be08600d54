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
async def readyz(queue: QueueDep) -> dict:
    """This API can take work: Redis answers. Workers are not required (jobs wait for them:
    workers may scale to zero); ``GET /v1/models`` shows the live ones."""
    try:
        await queue.redis.ping()
    except Exception as exc:
        raise Unavailable(
            f"Redis does not answer: {type(exc).__name__}", code="redis_down"
        ) from exc
    return {"status": "ready"}


@router.get("/metrics")
async def prometheus_metrics(registry: RegistryDep, queue: QueueDep) -> Response:
    """Queue depths and live workers are read from Redis at each scrape."""
    try:
        for spec in registry.models.values():
            for v in spec.variants:
                depth, oldest = await queue.queued(spec.name, v)
                metrics.QUEUE_DEPTH.labels(spec.name, v).set(depth)
                metrics.QUEUE_OLDEST_SECONDS.labels(spec.name, v).set(oldest or 0.0)
                metrics.WORKERS_LIVE.labels(spec.name, v).set(
                    await queue.live_workers(spec.name, v)
                )
    except Exception:  # without Redis the other metrics still answer
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
