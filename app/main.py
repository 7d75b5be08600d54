"""``create_app()``: the API process. It validates, queues and reports; it never imports torch.

Run with ``uvicorn --factory app.main:create_app`` (or ``python -m app``, which also starts
Redis and the workers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from redis import asyncio as aioredis

from app import metrics
from app.api import compare, generations, health, jobs, models
from app.comparison import shadow_loop
from app.config import Settings, get_settings
from app.errors import install_error_handlers
from app.queue.client import JobQueue
from app.queue.keys import Keys
from app.registry import load_registry

__all__ = ["create_app"]

log = logging.getLogger("app")

STATIC = Path(__file__).resolve().parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    registry = load_registry(settings.registry)  # fail fast on a bad registry

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        redis = aioredis.Redis.from_url(settings.redis_url)
        queue = JobQueue(
            redis,
            Keys(settings.key_prefix),
            queue_max=settings.queue_max,
            job_ttl_s=settings.job_ttl_s,
            heartbeat_s=settings.heartbeat_s,
        )
        app.state.settings, app.state.registry, app.state.queue = settings, registry, queue
        try:
            for spec in registry.models.values():
                for variant in spec.variants:
                    await queue.ensure_group(spec.name, variant)
        except Exception as exc:  # /readyz reports it; the API still starts
            log.warning("cannot reach Redis at start: %s", exc)
        shadow = None
        if settings.shadow_compare_s > 0:
            shadow = asyncio.create_task(shadow_loop(settings, registry, queue))
        try:
            yield
        finally:
            if shadow is not None:
                shadow.cancel()
            await redis.aclose()

    app = FastAPI(
        title="Quantized text-to-image service",
        version="0.1.0",
        description="OpenAI-Images-compatible API over full-precision and quantized variants.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for module in (generations, jobs, compare, models, health):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """The playground page (its assets are served from /static; no external CDN)."""
        return FileResponse(STATIC / "index.html")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            metrics.REQUESTS.labels(template, request.method, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(template).observe(time.perf_counter() - t0)

    return app
