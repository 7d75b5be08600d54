"""Dependencies of the routes: settings, registry and queue from app.state; who calls."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.errors import RateLimited, Unavailable
from app.queue.client import JobQueue
from app.queue.records import JobRequest
from app.registry import Registry

__all__ = ["Owner", "QueueDep", "RegistryDep", "SettingsDep", "check_rate", "check_workers"]

NO_WORKER_RETRY_S = 10  # Retry-After when a variant that requires a live worker has none


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


def _owner(request: Request) -> str:
    """Who calls, as ``app.api.middleware.Guard`` authenticated it (every /v1/ route)."""
    return request.state.owner


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[Registry, Depends(_registry)]
QueueDep = Annotated[JobQueue, Depends(_queue)]
Owner = Annotated[str, Depends(_owner)]


async def check_rate(queue: JobQueue, settings: Settings, owner: str) -> None:
    """Count one valid submission of ``owner``; 429 past its per-minute budget. Called once a
    request has been validated, so refused requests do not use up the budget."""
    retry = await queue.rate_limit(owner, settings.rate_limit_per_minute)
    if retry is not None:
        raise RateLimited(
            f"more than {settings.rate_limit_per_minute} submissions this minute",
            headers={"Retry-After": str(retry)},
        )


async def check_workers(registry: Registry, queue: JobQueue, requests: list[JobRequest]) -> None:
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
