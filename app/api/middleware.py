"""The two ASGI middlewares every request passes, outermost first.

``Observe`` counts each request by route template, a method from a fixed set and the status
actually sent. ``Guard`` runs before any route: it refuses a body over ``T2I_MAX_BODY_BYTES``
while reading it (413), authenticates ``/v1/`` requests before their body is parsed (401;
429 for a client address with too many failed attempts this minute), and answers any error a
route did not map with the one error body, so the connection stays usable.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.auth import owner_of
from app.errors import AuthError, PayloadTooLarge, RateLimited, error_response
from app.queue.records import ANONYMOUS

__all__ = ["METHODS", "Guard", "Observe"]

log = logging.getLogger(__name__)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PROTECTED = "/v1/"
# bodies that may hold images
UPLOADS = frozenset({"/v1/images/edits", "/v1/jobs", "/v1/compare", "/v1/comparisons"})


class Observe:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500  # what the server sends if the app fails before answering

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            metrics.REQUESTS.labels(route, method, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - t0)


class Guard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if scope["path"].startswith(PROTECTED):
                scope.setdefault("state", {})["owner"] = await _authenticate(scope, state)
            limit = (
                state.settings.max_upload_bytes
                if scope["path"] in UPLOADS
                else state.settings.max_body_bytes
            )
            body = await _read_body(scope, receive, limit)
            await self.app(scope, _replay(body, receive), tracked)
        except Exception as exc:
            if started:  # mid-response (a stream): only closing the connection is left
                raise
            await error_response(exc)(scope, receive, send)


async def _authenticate(scope: Scope, state) -> str:
    settings, queue = state.settings, state.queue
    if not settings.api_keys:
        return ANONYMOUS
    address = (scope.get("client") or ("unknown",))[0]
    limit = settings.auth_failures_per_minute
    retry = await queue.auth_throttled(address, limit)
    if retry is not None:
        raise RateLimited(
            f"more than {limit} failed authentications from this address this minute",
            code="auth_throttled",
            headers={"Retry-After": str(retry)},
        )
    try:
        return owner_of(_header(scope, b"authorization"), settings.api_keys)
    except AuthError:
        await queue.count_auth_failure(address)
        raise


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it exceeds ``limit`` bytes: by its declared
    length before reading, or while reading when it has none."""
    declared = _header(scope, b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes", param="body")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes", param="body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then waits on the client (disconnects)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
