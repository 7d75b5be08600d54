"""Who calls: an API key checked in constant time and kept only as a short hash."""

from __future__ import annotations

import hashlib
import hmac

from app.errors import AuthError
from app.queue.records import ANONYMOUS

__all__ = ["owner_of"]


def owner_of(authorization: str | None, api_keys: list[str]) -> str:
    """The owner of what a caller makes: a short hash of its API key (keys themselves are never
    stored or logged), or ``anonymous`` when the service has no keys. AuthError otherwise."""
    if not api_keys:
        return ANONYMOUS
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
    matched = False
    for key in api_keys:  # every key compared, in constant time
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not matched:
        raise AuthError("the API key is not valid")
    return hashlib.sha256(token.encode()).hexdigest()[:16]
