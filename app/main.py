"""``create_app()``: the API process. It validates, queues and reports; it never imports torch.

Run with ``uvicorn --factory app.main:create_app`` (or ``python -m app``, which also starts
Redis and the workers).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.api import compare, generations, health, jobs, models
from app.api.middleware import Guard, Observe
from app.comparison import shadow_loop
from app.config import Settings, get_settings
from app.errors import install_error_handlers
from app.queue.client import JobQueue
from app.queue.connect import api_client, listener_client
from app.queue.keys import Keys
from app.queue.listener import Listener
from app.registry import load_registry

__all__ = ["create_app"]

log = logging.getLogger("app")

STATIC = Path(__file__).resolve().parent / "static"
LISTEN_BLOCK_S = 10.0  # the shared XREAD's block time; a new subscription wakes it at once


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    registry = load_registry(settings.registry)  # fail fast on a bad registry

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        redis = api_client(settings)
        keys = Keys(settings.key_prefix)
        listener = Listener(
            listener_client(settings, LISTEN_BLOCK_S), redis, keys, block_s=LISTEN_BLOCK_S
        )
        listener.start()
        queue = JobQueue(
            redis,
            listener,
            keys,
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
            await listener.close()
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

    app.add_middleware(Guard)
    app.add_middleware(Observe)  # outermost: it sees the status Guard answers with
    _document_registry(app, registry)
    return app


REQUESTS = ("GenerationRequest", "JobSubmission", "CompareRequest")  # bodies naming models


def _document_registry(app: FastAPI, registry) -> None:
    """The OpenAPI document names this registry's models, variants and sizes as the values of
    the request fields that take them, so a client (or a fuzzer) knows what will be served."""
    build = app.openapi
    values = {
        "model": sorted(registry.models),
        "variant": sorted({v for spec in registry.models.values() for v in spec.variants}),
        "size": sorted({s for spec in registry.models.values() for s in spec.sizes} | {"auto"}),
        "scheduler": sorted({n for spec in registry.models.values() for n in spec.schedulers}),
    }

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema["components"]["schemas"]
            edits = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
            for fields in (
                *(components.get(name, {}).get("properties", {}) for name in REQUESTS),
                edits["multipart/form-data"]["schema"]["properties"],
            ):
                for field, allowed in values.items():
                    if field in fields:
                        fields[field]["examples"] = allowed
                        fields[field]["enum"] = (
                            [*allowed, None] if "anyOf" in fields[field] else allowed
                        )
        return app.openapi_schema

    app.openapi = openapi
