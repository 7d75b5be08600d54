"""Dependencies of the routes: settings, registry and queue from app.state; the API key."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.errors import AuthError, RateLimited
from app.queue.client import JobQueue
from app.registry import Registry

__all__ = ["Caller", "Owner", "QueueDep", "RegistryDep", "SettingsDep", "rate_limited"]


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[Registry, Depends(_registry)]
QueueDep = Annotated[JobQueue, Depends(_queue)]


def caller(request: Request, settings: SettingsDep) -> str:
    """Who calls: a short hash of the API key (keys themselves are never stored or logged),
    or "anonymous" when the service has no keys configured. 401 without a valid key."""
    if not settings.api_keys:
        return "anonymous"
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
    matched = False
    for key in settings.api_keys:  # every key compared, in constant time
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not matched:
        raise AuthError("the API key is not valid")
    return hashlib.sha256(token.encode()).hexdigest()[:16]


Owner = Annotated[str, Depends(caller)]


async def rate_limited(owner: Owner, settings: SettingsDep, queue: QueueDep) -> str:
    """The caller, once its per-minute budget of job submissions allows one more (else 429)."""
    retry = await queue.rate_limit(owner, settings.rate_limit_per_minute)
    if retry is not None:
        raise RateLimited(
            f"more than {settings.rate_limit_per_minute} submissions this minute",
            headers={"Retry-After": str(retry)},
        )
    return owner


Caller = Annotated[str, Depends(rate_limited)]
