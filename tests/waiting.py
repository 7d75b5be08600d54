"""Helpers the service tests and the compose-stack tests share: polling, and reading SSE."""

from __future__ import annotations

import json
import time

__all__ = ["read_events", "wait_until"]


def wait_until(predicate, timeout: float = 30.0, every: float = 0.05, what: str = "condition"):
    """``predicate()``'s first truthy value, polled every ``every`` s; AssertionError after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def read_events(response) -> list[dict]:
    """The Server-Sent Events of a streamed httpx response, to its end: ``{"id", "event",
    "data"}`` with ``data`` parsed as JSON; comments (keep-alives) are skipped."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events, event = [], {}
    for line in response.iter_lines():
        if not line:
            if "data" in event:
                events.append(event)
            event = {}
        elif line.startswith(("id:", "event:", "data:")):
            key, _, value = line.partition(":")
            event[key] = json.loads(value) if key == "data" else value.strip()
    return events
