"""Which of a worker's variants are loaded, under a budget of bytes.

A variant loads at its first job; beyond the budget the least recently used variants that are
not pinned are evicted first (their denoiser, and shared components nobody else uses). A load
that fails (a corrupt artifact, out of memory, a variant too big for the budget) fails that
variant's jobs with the reason, for ``RETRY_FAILED_S``; the worker and its other variants go
on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from app import metrics
from app.worker.components import Components

__all__ = ["LoadFailed", "Residency", "Slot"]

log = logging.getLogger("app.worker.residency")

RETRY_FAILED_S = 30.0  # a failed load is tried again at the first job after this long
FIRST_LOAD_COST_S = 5.0  # what a load is taken to cost before one has been timed


class LoadFailed(Exception):
    """A variant could not be loaded; ``code`` names why (load_failed, out_of_memory,
    over_budget)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


T = TypeVar("T")  # what a load returns: the worker's loaded pipeline


@dataclass(frozen=True)
class Slot(Generic[T]):
    """How to bring one variant in: ``load()`` returns what runs its jobs (the caller's
    object), ``needs()`` the bytes loading it would add to what ``components`` holds."""

    key: tuple[str, str]  # (model, variant)
    load: Callable[[], T]
    needs: Callable[[], int]


@dataclass
class _Failure:
    message: str
    code: str
    until: float


class Residency(Generic[T]):
    def __init__(
        self,
        components: Components,
        budget: int | None = None,
        pinned: frozenset[tuple[str, str]] = frozenset(),
        on_change: Callable[[tuple[str, str], T | None], None] | None = None,
    ) -> None:
        """``on_change(key, loaded)``: after a variant is loaded (``loaded``) or evicted
        (None), to publish it."""
        self.components, self.budget, self.pinned = components, budget, pinned
        self.on_change = on_change or (lambda key, loaded: None)
        self.resident: OrderedDict[tuple[str, str], T] = OrderedDict()  # LRU first
        self.failures: dict[tuple[str, str], _Failure] = {}
        self.load_seconds: dict[tuple[str, str], float] = {}  # the latest load of each

    def load_cost(self, key: tuple[str, str]) -> float:
        """Seconds loading the variant is expected to take: its latest load's."""
        return self.load_seconds.get(key, FIRST_LOAD_COST_S)

    def get(self, slot: Slot[T], on_loading: Callable[[], None] | None = None) -> T:
        """The loaded variant, loading it first (after ``on_loading()``) when it is not
        resident; LoadFailed when it cannot be."""
        key = slot.key
        if key in self.resident:
            self.resident.move_to_end(key)
            return self.resident[key]
        failure = self.failures.get(key)
        if failure is not None and time.monotonic() < failure.until:
            raise LoadFailed(failure.message, failure.code)
        if on_loading is not None:
            on_loading()
        labels = {"model": key[0], "variant": key[1]}
        try:
            self._make_room(slot)
            t0 = time.perf_counter()
            loaded = slot.load()
        except LoadFailed as exc:
            self._failed(key, str(exc), exc.code)
            raise
        except Exception as exc:
            self.components.release(_user(key))  # what it took before failing
            release_memory()
            message, code = describe_failure(exc)
            self._failed(key, message, code)
            raise LoadFailed(message, code) from exc
        seconds = time.perf_counter() - t0
        release_memory()
        self.load_seconds[key] = seconds
        self.failures.pop(key, None)
        self.resident[key] = loaded
        metrics.LOADS.labels(**labels).inc()
        metrics.LOAD_SECONDS.labels(**labels).observe(seconds)
        self.on_change(key, loaded)
        log.info("loaded %s/%s in %.1f s (%d bytes held)", *key, seconds, self.components.total())
        return loaded

    def _make_room(self, slot: Slot[T]) -> None:
        """Evict until loading ``slot`` fits the budget (what it needs grows when an eviction
        drops a shared component it uses)."""
        if self.budget is None:
            return
        key = slot.key
        while self.components.total() + (needed := slot.needs()) > self.budget:
            victims = [k for k in self.resident if k not in self.pinned and k != key]
            if not victims:
                held = self.components.total()
                raise LoadFailed(
                    f"{key[0]}/{key[1]} needs {needed:,} bytes; the worker's memory budget is "
                    f"{self.budget:,} and its pinned or running variants hold {held:,}",
                    "over_budget",
                )
            self.evict(victims[0])

    def evict(self, key: tuple[str, str]) -> None:
        self.resident.pop(key, None)
        dropped = self.components.release(_user(key))
        release_memory()
        metrics.EVICTIONS.labels(model=key[0], variant=key[1]).inc()
        self.on_change(key, None)
        log.info(
            "evicted %s/%s (%d components dropped; %d bytes held)",
            *key,
            len(dropped),
            self.components.total(),
        )

    def _failed(self, key: tuple[str, str], message: str, code: str) -> None:
        log.error("cannot load %s/%s: %s", *key, message)
        metrics.LOAD_FAILURES.labels(model=key[0], variant=key[1], reason=code).inc()
        self.failures[key] = _Failure(message, code, time.monotonic() + RETRY_FAILED_S)


def release_memory() -> None:
    """Collect, then hand the heap that freed tensors left back to the system (glibc keeps it
    otherwise: a quantized denoiser is built as a float model first, and an evicted one's
    pages stay counted in the worker's RSS)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def _user(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}"


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """A load's exception as (message, code): out of memory (torch's or the allocator's), or
    any other failure with its type."""
    name, text = type(exc).__name__, str(exc)
    lowered = text.lower()
    if (
        isinstance(exc, MemoryError)
        or "OutOfMemory" in name
        or "out of memory" in lowered
        or "can't allocate memory" in lowered
        or "cannot allocate memory" in lowered
    ):
        return f"out of memory while loading: {text}".strip(), "out_of_memory"
    return f"cannot load the variant: {name}: {text}", "load_failed"
