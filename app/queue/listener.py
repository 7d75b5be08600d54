"""One shared reader of job streams per API process, so that waiting costs no connection.

Every SSE stream follows its job's ``events`` stream and every synchronous request waits on its
job's ``done`` stream. Were each to block in its own ``XREAD``, each would hold a pooled Redis
connection for as long as its job runs, and a few hundred open streams would starve every other
route. Instead one task holds one connection and blocks in a single ``XREAD`` over every stream
someone follows (500 streams on one job are one key in it), handing each new entry to the
subscriptions positioned before it. A new subscription wakes that ``XREAD`` through a small
stream of this process's own (``Keys.wake``), so it is read at once.

If Redis stalls or goes away the reader backs off and tries again; subscriptions simply see no
entries meanwhile (SSE sends keep-alives, waiters time out as documented), and nothing read is
lost: each subscription resumes from the last id it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from redis import asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from app.queue.keys import Keys

__all__ = ["Listener", "Subscription", "stream_id"]

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
Parsed = tuple[tuple[int, int], str, dict[str, str]]  # an entry with its id as integers


def stream_id(value: str) -> tuple[int, int] | None:
    """A Redis stream id ``ms-seq`` as a pair of integers, or None if it is not one: ASCII
    digits only, each part below 2**64 (what Redis itself accepts)."""
    ms, sep, seq = value.partition("-")
    if not sep or not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return None
    if len(ms) > 20 or len(seq) > 20:
        return None
    pair = int(ms), int(seq)
    return pair if max(pair) < 2**64 else None


class Subscription:
    """Entries of one stream after a position, as the listener reads them."""

    def __init__(self, after: str) -> None:
        self.after = after
        self.position = stream_id(after) or (0, 0)
        self._entries: asyncio.Queue[list[Entry]] = asyncio.Queue()

    def offer(self, entries: list[Parsed]) -> None:
        """Keep the entries after this subscription's position (ids parsed once, by the
        listener, for all the subscriptions of a stream)."""
        new = [(eid, data) for pair, eid, data in entries if pair > self.position]
        if new:
            self.after, self.position = new[-1][0], stream_id(new[-1][0])
            self._entries.put_nowait(new)

    async def next(self, timeout_s: float) -> list[Entry]:
        """The next entries, or [] when none came within ``timeout_s``."""
        try:
            return await asyncio.wait_for(self._entries.get(), timeout_s)
        except TimeoutError:
            return []


class Listener:
    """The API process's one ``XREAD BLOCK`` over every followed stream."""

    def __init__(
        self, client: aioredis.Redis, waker: aioredis.Redis, keys: Keys, block_s: float
    ) -> None:
        self.client, self.waker = client, waker  # waker: the ordinary pool, for the wake XADD
        self.wake_key = keys.wake(uuid.uuid4().hex)
        self.block_ms = int(block_s * 1000)
        self._wake_after = "0-0"
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def followed(self) -> int:
        """How many streams the listener reads now."""
        return len(self._subscriptions)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-listener")

    async def close(self) -> None:
        """Stop reading: wake the XREAD so the loop sees it is closing (a cancel would wait
        out the block inside redis-py), then cancel it if it has not ended within a second."""
        self._closing = True
        if self._task is not None:
            await self._wake()
            done, _ = await asyncio.wait({self._task}, timeout=1.0)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._task
        with contextlib.suppress(RedisError):
            await self.waker.delete(self.wake_key)
        await self.client.aclose()

    @contextlib.asynccontextmanager
    async def follow(self, key: str, after: str = "0-0") -> AsyncIterator[Subscription]:
        """Follow stream ``key`` from after ``after`` while the block lasts."""
        subscription = Subscription(after)
        self._subscriptions.setdefault(key, set()).add(subscription)
        try:
            await self._wake()
            yield subscription
        finally:
            followers = self._subscriptions.get(key)
            if followers is not None:
                followers.discard(subscription)
                if not followers:
                    del self._subscriptions[key]

    async def _wake(self) -> None:
        try:
            pipe = self.waker.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": 1}, maxlen=16, approximate=True)
            pipe.expire(self.wake_key, 300)
            await pipe.execute()
        except RedisError as exc:  # the listener reads the new stream at its next round anyway
            log.debug("cannot wake the listener: %s", exc)

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            streams = {self.wake_key: self._wake_after}
            for key, followers in self._subscriptions.items():
                streams[key] = min(followers, key=lambda s: s.position).after
            try:
                reply = await self.client.xread(streams, block=self.block_ms, count=200)
                failures = 0
            except ResponseError as exc:
                if self._closing:
                    return
                log.error("the listener's XREAD was refused: %s", exc)
                await self._drop_foreign_keys()
                await asyncio.sleep(0.1)
                continue
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                failures += 1
                log.warning("the listener lost Redis (%s); retrying", type(exc).__name__)
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
                continue
            for raw_key, raw_entries in reply or []:
                key = _s(raw_key)
                if key == self.wake_key:
                    self._wake_after = _s(raw_entries[-1][0])
                    continue
                entries = [
                    (stream_id(eid := _s(i)), eid, {_s(a): _s(b) for a, b in f.items()})
                    for i, f in raw_entries
                ]
                for subscription in list(self._subscriptions.get(key, ())):
                    subscription.offer(entries)

    async def _drop_foreign_keys(self) -> None:
        """A key that is not a stream makes the whole XREAD fail: stop following it."""
        for key in list(self._subscriptions):
            with contextlib.suppress(RedisError):
                if _s(await self.client.type(key)) not in ("stream", "none"):
                    log.error("stopped following %s: it is not a stream", key)
                    self._subscriptions.pop(key, None)


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
