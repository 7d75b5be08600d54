"""The API's side of the queue (redis.asyncio): submit, look up, cancel, follow, fetch.

Ordinary calls go through the pooled client; following a job (SSE) and waiting for one go
through the process's one ``Listener``, so they hold no pooled connection while they wait.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from redis import asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from app.errors import QueueFull
from app.queue import scripts
from app.queue.keys import GROUP, Keys
from app.queue.listener import Listener, Subscription
from app.queue.records import ANONYMOUS, TERMINAL, Job, JobRequest, JobStatus, decode, encode_new

__all__ = ["JobQueue", "Submitted"]

DEFAULT_JOB_SECONDS = 5.0  # Retry-After's guess before any job of a variant has finished
RECHECK_S = 5.0  # a waiter re-reads the job record at least this often (expired? Redis lost?)


@dataclass(frozen=True)
class Submitted:
    id: str
    position: int  # jobs ahead of it in its queue


class JobQueue:
    def __init__(
        self,
        redis: aioredis.Redis,
        listener: Listener,
        keys: Keys,
        *,
        queue_max: int,
        job_ttl_s: int,
        heartbeat_s: float,
    ) -> None:
        self.redis, self.listener, self.keys = redis, listener, keys
        self.queue_max, self.job_ttl_s, self.heartbeat_s = queue_max, job_ttl_s, heartbeat_s
        self._enqueue = redis.register_script(scripts.ENQUEUE)
        self._cancel = redis.register_script(scripts.CANCEL)

    async def ensure_group(self, model: str, variant: str) -> None:
        try:
            await self.redis.xgroup_create(
                self.keys.stream(model, variant), GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(
        self, request: JobRequest, *, idempotency: str | None = None, owner: str = ANONYMOUS
    ) -> Submitted:
        """Queue a job; the same idempotency key (per owner) gives back the same job."""
        return (await self.submit_all([request], idempotency=idempotency, owner=owner))[0]

    async def submit_all(
        self,
        requests: list[JobRequest],
        *,
        idempotency: str | None = None,
        owner: str = ANONYMOUS,
    ) -> list[Submitted]:
        """Queue every job or none (429 ``queue_full`` naming the full queue), atomically."""
        k, now = self.keys, time.time()
        job_ids = [uuid.uuid4().hex for _ in requests]
        keys = [k.idempotency(owner, idempotency or "-")]
        args = [self.queue_max, self.job_ttl_s, repr(now), "1" if idempotency else "0", k.job("")]
        for job_id, r in zip(job_ids, requests, strict=True):
            m, v = r.model, r.variant
            keys += [k.job(job_id), k.queued(m, v), k.stream(m, v), k.events(job_id)]
            fields = encode_new(job_id, r, now, owner)
            args += [job_id, 2 * len(fields), *[x for pair in fields.items() for x in pair]]
        reply = [_s(x) for x in await self._enqueue(keys=keys, args=args)]
        outcome = reply[0]
        if outcome == "existing":
            job = await self.get(reply[1])
            return [Submitted(reply[1], await self.position(job) if job else 0)]
        if outcome == "full":
            full, depth = requests[int(reply[1]) - 1], int(reply[2])
            retry = await self.retry_after(full.model, full.variant, depth)
            raise QueueFull(
                f"the queue of {full.model}/{full.variant} is full ({depth} jobs waiting); "
                f"retry in {retry} s",
                param="model",
                headers={"Retry-After": str(retry)},
            )
        return [Submitted(j, int(p)) for j, p in zip(job_ids, reply[1:], strict=True)]

    async def get(self, job_id: str) -> Job | None:
        fields = await self.redis.hgetall(self.keys.job(job_id))
        return decode(fields) if fields else None

    async def position(self, job: Job) -> int:
        """Jobs ahead of this one in its queue (0: next); 0 once it has left the queue."""
        if job.status != JobStatus.QUEUED:
            return 0
        rank = await self.redis.zrank(
            self.keys.queued(job.request.model, job.request.variant), job.id
        )
        return int(rank) if rank is not None else 0

    async def cancel(self, job: Job) -> str:
        m, v = job.request.model, job.request.variant
        k = self.keys
        outcome = await self._cancel(
            keys=[k.job(job.id), k.queued(m, v), k.events(job.id), k.stream(m, v), k.done(job.id)],
            args=[job.id, repr(time.time()), self.job_ttl_s],
        )
        return _s(outcome)

    async def replay(self, job_id: str, after: str) -> list[tuple[str, dict]]:
        """The job's events after the stream id ``after``, as they are now (no waiting)."""
        reply = await self.redis.xread({self.keys.events(job_id): after}, count=1000)
        if not reply:
            return []
        return [(_s(eid), {_s(a): _s(b) for a, b in data.items()}) for eid, data in reply[0][1]]

    def follow(self, job_id: str, after: str):
        """``async with queue.follow(id, after) as events``: the job's events as they come."""
        return self.listener.follow(self.keys.events(job_id), after)

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it has finished, or None if it has not within ``timeout_s``.

        Follows the job's ``done`` stream through the listener, so a waiter wakes once, not at
        every step, and holds no connection meanwhile. A Redis stall while waiting is waited
        out (the job goes on in its worker); it is raised only if it lasts to the deadline.
        """
        deadline = time.monotonic() + timeout_s
        job = await self.get(job_id)
        if job is None or job.status in TERMINAL:
            return job
        done: Subscription
        async with self.listener.follow(self.keys.done(job_id)) as done:
            while True:
                stalled = None
                try:
                    job = await self.get(job_id)  # read after subscribing: no finish is missed
                except RedisError as exc:
                    stalled = exc
                if stalled is None and (job is None or job.status in TERMINAL):
                    return job
                left = deadline - time.monotonic()
                if left <= 0:
                    if stalled is not None:
                        raise stalled
                    return None
                await done.next(min(left, RECHECK_S))

    async def store_comparison(self, comparison_id: str, record: dict) -> None:
        key = self.keys.comparison(comparison_id)
        await self.redis.set(key, json.dumps(record), ex=self.job_ttl_s)

    async def comparison(self, comparison_id: str) -> dict | None:
        raw = await self.redis.get(self.keys.comparison(comparison_id))
        return json.loads(raw) if raw else None

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self.redis.get(self.keys.image(job_id, index))

    async def preview(self, job_id: str, index: int, image: int = 0) -> bytes | None:
        return await self.redis.get(self.keys.preview(job_id, index, image))

    async def store_uploads(self, *uploads) -> None:
        """An edit's inputs (``app.uploads.Upload``; None: absent), kept as long as the jobs
        naming them."""
        if not any(uploads):
            return
        pipe = self.redis.pipeline(transaction=False)
        for upload in filter(None, uploads):
            pipe.set(self.keys.upload(upload.sha256), upload.data, ex=self.job_ttl_s)
        await pipe.execute()

    async def latents(self, job_id: str) -> bytes | None:
        return await self.redis.get(self.keys.latents(job_id))

    async def queued(self, model: str, variant: str) -> tuple[int, float | None]:
        """The jobs that can still run in a variant's queue (those whose record expired are
        dropped first) and how long the oldest has waited (None: empty). One round trip."""
        key, now = self.keys.queued(model, variant), time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.zremrangebyscore(key, "-inf", f"({now - self.job_ttl_s!r}")
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        _, depth, first = await pipe.execute()
        oldest = round(max(0.0, now - float(first[0][1])), 3) if first else None
        return int(depth), oldest

    async def live_workers(self, model: str, variant: str) -> int:
        """Workers whose heartbeat is at most three heartbeat periods old."""
        since = time.time() - 3 * self.heartbeat_s
        return int(await self.redis.zcount(self.keys.workers(model, variant), since, "+inf"))

    async def resident(self, model: str, variant: str) -> tuple[int, int | None]:
        """How many live workers hold the variant loaded, and its denoiser's bytes there
        (None: none holds it). One round trip."""
        since = time.time() - 3 * self.heartbeat_s
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(self.keys.workers(model, variant), since, "+inf")
        pipe.hgetall(self.keys.resident(model, variant))
        live, held = await pipe.execute()
        live = {w.decode() if isinstance(w, bytes) else w for w in live}
        sizes = [
            int(json.loads(v).get("bytes", 0))
            for k, v in held.items()
            if (k.decode() if isinstance(k, bytes) else k) in live
        ]
        return len(sizes), max(sizes) if sizes else None

    async def retry_after(self, model: str, variant: str, depth: int) -> int:
        """Seconds until the queue has room: depth x recent mean job time / live workers."""
        recent = [
            float(x) for x in await self.redis.lrange(self.keys.durations(model, variant), 0, 19)
        ]
        mean = sum(recent) / len(recent) if recent else DEFAULT_JOB_SECONDS
        workers = max(1, await self.live_workers(model, variant))
        return max(1, math.ceil(mean * max(1, depth) / workers))

    async def rate_limit(self, owner: str, per_minute: int) -> int | None:
        """Count one submission; None when the owner may go on, else the seconds until its
        minute window ends."""
        return await self._count(self.keys.rate, owner, per_minute)

    async def auth_throttled(self, address: str, per_minute: int) -> int | None:
        """None when this client address may try a key again; else the seconds to wait."""
        window, left = _minute()
        count = await self.redis.get(self.keys.auth_failures(address, window))
        return left if count is not None and int(count) >= per_minute else None

    async def count_auth_failure(self, address: str) -> None:
        await self._count(self.keys.auth_failures, address, 0)

    async def _count(self, key_of, who: str, per_minute: int) -> int | None:
        window, left = _minute()
        key = key_of(who, window)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = await pipe.execute()
        return left if int(count) > per_minute else None


def _minute() -> tuple[int, int]:
    """The current minute window of the counters, and the whole seconds until it ends."""
    now = time.time()
    window = int(now // 60)
    return window, max(1, math.ceil((window + 1) * 60 - now))


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
