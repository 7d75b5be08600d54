"""The API's side of the queue (redis.asyncio): submit, look up, cancel, follow, fetch."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from redis import asyncio as aioredis
from redis.exceptions import ResponseError

from app.errors import QueueFull
from app.queue import scripts
from app.queue.keys import GROUP, Keys
from app.queue.records import TERMINAL, Job, JobRequest, JobStatus, decode, encode_new

__all__ = ["JobQueue", "Submitted"]

DEFAULT_JOB_SECONDS = 5.0  # Retry-After's guess before any job of a variant has finished


@dataclass(frozen=True)
class Submitted:
    id: str
    position: int  # jobs ahead of it in its queue


class JobQueue:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        queue_max: int,
        job_ttl_s: int,
        heartbeat_s: float,
    ) -> None:
        self.redis, self.keys = redis, keys
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
        self, request: JobRequest, *, idempotency: str | None = None, owner: str = "anonymous"
    ) -> Submitted:
        """Queue a job; the same idempotency key (per owner) gives back the same job."""
        job_id = uuid.uuid4().hex
        m, v, k = request.model, request.variant, self.keys
        fields = encode_new(job_id, request, time.time())
        idem_key = k.idempotency(owner, idempotency) if idempotency else k.idempotency(owner, "-")
        outcome, value = await self._enqueue(
            keys=[k.job(job_id), k.queued(m, v), k.stream(m, v), k.events(job_id), idem_key],
            args=[
                job_id,
                self.queue_max,
                self.job_ttl_s,
                repr(time.time()),
                "1" if idempotency else "0",
                *[x for pair in fields.items() for x in pair],
            ],
        )
        outcome, value = _s(outcome), _s(value)
        if outcome == "existing":
            job = await self.get(value)
            return Submitted(value, await self.position(job) if job else 0)
        if outcome == "full":
            depth = int(value)
            retry = await self.retry_after(m, v, depth)
            raise QueueFull(
                f"the queue of {m}/{v} is full ({depth} jobs waiting); retry in {retry} s",
                param="model",
                headers={"Retry-After": str(retry)},
            )
        return Submitted(job_id, int(value))

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

    async def events(self, job_id: str, after: str, block_ms: int | None) -> list[tuple[str, dict]]:
        """Events after the stream id ``after`` ("0-0": from the start), waiting up to block_ms
        for one (None: not at all)."""
        reply = await self.redis.xread({self.keys.events(job_id): after}, block=block_ms, count=100)
        if not reply:
            return []
        return [(_s(eid), {_s(a): _s(b) for a, b in data.items()}) for eid, data in reply[0][1]]

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it has finished, or None if it has not within ``timeout_s``.

        Blocks on the job's ``done`` stream, so a waiter wakes once, not at every step.
        """
        deadline = time.monotonic() + timeout_s
        job = await self.get(job_id)
        while job is not None and job.status not in TERMINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            block_ms = max(1, int(min(left, 5.0) * 1000))
            await self.redis.xread({self.keys.done(job_id): "0-0"}, block=block_ms, count=1)
            job = await self.get(job_id)
        return job

    async def store_comparison(self, comparison_id: str, record: dict) -> None:
        key = self.keys.comparison(comparison_id)
        await self.redis.set(key, json.dumps(record), ex=self.job_ttl_s)

    async def comparison(self, comparison_id: str) -> dict | None:
        raw = await self.redis.get(self.keys.comparison(comparison_id))
        return json.loads(raw) if raw else None

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self.redis.get(self.keys.image(job_id, index))

    async def latents(self, job_id: str) -> bytes | None:
        return await self.redis.get(self.keys.latents(job_id))

    async def depth(self, model: str, variant: str) -> int:
        return int(await self.redis.zcard(self.keys.queued(model, variant)))

    async def live_workers(self, model: str, variant: str) -> int:
        """Workers whose heartbeat is at most three heartbeat periods old."""
        since = time.time() - 3 * self.heartbeat_s
        return int(await self.redis.zcount(self.keys.workers(model, variant), since, "+inf"))

    async def retry_after(self, model: str, variant: str, depth: int) -> int:
        """Seconds until the queue has room: depth x recent mean job time / live workers."""
        recent = [
            float(x) for x in await self.redis.lrange(self.keys.durations(model, variant), 0, 19)
        ]
        mean = sum(recent) / len(recent) if recent else DEFAULT_JOB_SECONDS
        workers = max(1, await self.live_workers(model, variant))
        return max(1, math.ceil(mean * max(1, depth) / workers))

    async def rate_limit(self, owner: str, per_minute: int) -> int | None:
        """None when the owner may go on; else the seconds until its minute window ends."""
        now = time.time()
        window = int(now // 60)
        key = self.keys.rate(owner, window)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = await pipe.execute()
        if int(count) > per_minute:
            return max(1, math.ceil((window + 1) * 60 - now))
        return None


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
