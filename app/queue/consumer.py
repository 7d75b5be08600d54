"""The worker's side of the queue (sync redis): take jobs, report progress, finish, give up.

At-least-once: a job stays pending in the stream's consumer group until its worker finishes
it. A worker refreshes the idle time of what it holds at every heartbeat, so a long job is not
taken over; a job whose worker died goes idle and the next worker takes it with XAUTOCLAIM.
A job started ``max_deliveries`` times without finishing (it keeps killing workers) goes to the
dead-letter stream and is failed with the reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis
from redis.exceptions import ResponseError

from app.queue import scripts
from app.queue.keys import GROUP, Keys
from app.queue.records import Job, JobStatus, decode

__all__ = ["Claimed", "Consumer", "take_any"]


@dataclass
class Claimed:
    """A stream entry this worker holds, and the job it points to."""

    stream_id: str
    job: Job


class Consumer:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        model: str,
        variant: str,
        name: str,
        job_ttl_s: int,
        reclaim_idle_s: float,
        max_deliveries: int,
    ) -> None:
        self.redis, self.keys, self.model, self.variant, self.name = (
            client,
            keys,
            model,
            variant,
            name,
        )
        self.job_ttl_s, self.max_deliveries = job_ttl_s, max_deliveries
        self.reclaim_idle_ms = int(reclaim_idle_s * 1000)
        self.stream = keys.stream(model, variant)
        self._start = client.register_script(scripts.START)
        self._finish = client.register_script(scripts.FINISH)
        self._reconcile = client.register_script(scripts.RECONCILE)

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def reconcile(self) -> int:
        """Drop from the queued set the jobs that can no longer run (record expired, evicted
        or deleted; no longer queued), so depth counts only what can run. Their stream entries
        are skipped when taken. The number dropped."""
        return int(
            self._reconcile(
                keys=[self.keys.queued(self.model, self.variant)],
                args=[self.keys.job(""), repr(time.time()), self.job_ttl_s],
            )
        )

    # --- taking jobs -------------------------------------------------------------------------

    def take(self, count: int, block_ms: int | None) -> list[Claimed]:
        """Up to ``count`` jobs to run now: those left by dead workers first, then new ones
        (waiting up to ``block_ms`` for one; None: not at all).

        Jobs that turn out cancelled, already finished or expired are acknowledged and skipped;
        a poison job is dead-lettered.
        """
        entries = self._reclaim(count)
        if not entries:
            reply = self.redis.xreadgroup(
                GROUP, self.name, {self.stream: ">"}, count=count, block=block_ms
            )
            entries = [(_s(eid), data) for eid, data in reply[0][1]] if reply else []
        return self.start(entries)

    def oldest_wait(self) -> float | None:
        """Seconds the oldest job still queued (not taken) has waited; None when none is."""
        first = self.redis.zrange(self.keys.queued(self.model, self.variant), 0, 0, withscores=True)
        return max(0.0, time.time() - float(first[0][1])) if first else None

    def start(self, entries: list[tuple[str, dict]]) -> list[Claimed]:
        """Mark the jobs of entries read from this stream as started, and return those that
        can run."""
        claimed = []
        for stream_id, data in entries:
            job_id = _s(data.get(b"job", data.get("job", b"")))
            outcome = _s(
                self._start(
                    keys=[
                        self.keys.job(job_id),
                        self.keys.queued(self.model, self.variant),
                        self.keys.events(job_id),
                        self.keys.done(job_id),
                    ],
                    args=[
                        job_id,
                        repr(time.time()),
                        self.name,
                        self.max_deliveries,
                        self.job_ttl_s,
                    ],
                )
            )
            if outcome == "run":
                job = self.get(job_id)
                if job is not None:
                    claimed.append(Claimed(stream_id, job))
                    continue
            if outcome == "poison":
                self._dead_letter(stream_id, job_id)
            else:
                self.redis.xack(self.stream, GROUP, stream_id)
                self.redis.xdel(self.stream, stream_id)
        return claimed

    def _reclaim(self, count: int) -> list[tuple[str, dict]]:
        reply = self.redis.xautoclaim(
            self.stream, GROUP, self.name, self.reclaim_idle_ms, start_id="0-0", count=count
        )
        entries = reply[1]
        deleted = reply[2] if len(reply) > 2 else []  # Redis >= 7 lists deleted entries
        for eid in deleted:  # entries removed from the stream while pending
            self.redis.xack(self.stream, GROUP, eid)
        return [(_s(eid), data) for eid, data in entries if data]

    def _dead_letter(self, stream_id: str, job_id: str) -> None:
        job = self.get(job_id)
        deliveries = job.deliveries if job else self.max_deliveries
        reason = (
            f"given up after {deliveries} deliveries: each ended without a result "
            "(the worker running it died)"
        )
        self.redis.xadd(
            self.keys.dead_letter(),
            {"job": job_id, "model": self.model, "variant": self.variant, "reason": reason},
            maxlen=10_000,
        )
        self.finish(job_id, stream_id, JobStatus.FAILED, error=reason, error_code="dead_letter")

    # --- while running -----------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        fields = self.redis.hgetall(self.keys.job(job_id))
        return decode(fields) if fields else None

    def progress(self, claimed: list[Claimed], steps_done: list[int], steps: int) -> set[str]:
        """Record the steps done since the last call (one event each) for each job; the ids of
        the jobs asked to cancel. One round trip."""
        last = steps_done[-1]
        percent = int(100 * last / steps) if steps else 0
        pipe = self.redis.pipeline(transaction=False)
        for c in claimed:
            for step in steps_done:
                pipe.xadd(
                    self.keys.events(c.job.id),
                    {
                        "type": "progress",
                        "step": step,
                        "steps": steps,
                        "progress": int(100 * step / steps) if steps else 0,
                    },
                )
            pipe.hset(self.keys.job(c.job.id), mapping={"progress": percent, "step": last})
            pipe.hget(self.keys.job(c.job.id), "cancel_requested")
        replies = pipe.execute()
        per_job = len(steps_done) + 2
        flags = replies[per_job - 1 :: per_job]
        return {c.job.id for c, flag in zip(claimed, flags, strict=True) if _s(flag) == "1"}

    def heartbeat(self, holding: list[str]) -> None:
        """Say this worker is alive and reset the idle time of the entries it holds."""
        self.redis.zadd(self.keys.workers(self.model, self.variant), {self.name: time.time()})
        if holding:
            self.redis.xclaim(self.stream, GROUP, self.name, 0, holding, justid=True)

    def leave(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.workers(self.model, self.variant), self.name)
        pipe.hdel(self.keys.resident(self.model, self.variant), self.name)
        pipe.execute()

    def resident(self, denoiser_bytes: int | None) -> None:
        """Say this worker holds the variant loaded (its denoiser's bytes), or not (None)."""
        key = self.keys.resident(self.model, self.variant)
        if denoiser_bytes is None:
            self.redis.hdel(key, self.name)
        else:
            self.redis.hset(key, self.name, json.dumps({"bytes": denoiser_bytes}))

    def loading(self, claimed: list[Claimed]) -> None:
        """Tell the jobs' event streams that they wait for their variant to load."""
        pipe = self.redis.pipeline(transaction=False)
        for c in claimed:
            pipe.xadd(
                self.keys.events(c.job.id),
                {"type": "loading", "model": self.model, "variant": self.variant},
            )
        pipe.execute()

    def upload(self, sha256: str) -> bytes | None:
        """An edit's input (``Keys.upload``), or None once it has expired."""
        return self.redis.get(self.keys.upload(sha256))

    def store_previews(self, index: int, step: int, previews: dict[str, list[bytes]]) -> None:
        """Preview ``index``, made after ``step``, of each job (id -> its images' previews):
        stored, counted on the record, and announced on the job's events. One round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, images in previews.items():
            for i, data in enumerate(images):
                pipe.set(self.keys.preview(job_id, index, i), data, ex=self.job_ttl_s)
            pipe.hset(self.keys.job(job_id), "previews", index + 1)
            pipe.xadd(
                self.keys.events(job_id),
                {"type": "preview", "index": index, "step": step, "images": len(images)},
            )
        pipe.execute()

    # --- finishing ---------------------------------------------------------------------------

    def store_images(self, job_id: str, images: list[bytes], latents: bytes | None) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for i, data in enumerate(images):
            pipe.set(self.keys.image(job_id, i), data, ex=self.job_ttl_s)
        if latents is not None:
            pipe.set(self.keys.latents(job_id), latents, ex=self.job_ttl_s)
        pipe.execute()

    def finish(
        self,
        job_id: str,
        stream_id: str,
        status: JobStatus,
        *,
        error: str = "",
        error_code: str = "",
        images: int = 0,
        result: dict | None = None,
        duration: float | None = None,
    ) -> str:
        """Write the final status and acknowledge the entry; "duplicate" if already finished."""
        return _s(
            self._finish(
                keys=[
                    self.keys.job(job_id),
                    self.keys.events(job_id),
                    self.stream,
                    self.keys.durations(self.model, self.variant),
                    self.keys.done(job_id),
                ],
                args=[
                    GROUP,
                    stream_id,
                    status.value,
                    repr(time.time()),
                    self.job_ttl_s,
                    error_code,
                    error,
                    images,
                    json.dumps(result or {}),
                    "" if duration is None else repr(duration),
                ],
            )
        )


def _s(value) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def take_any(
    consumers: list[Consumer], count: int, block_ms: int
) -> list[tuple[Consumer, list[Claimed]]]:
    """Wait up to ``block_ms`` for new entries on any of the consumers' streams (one call;
    they share a client and a consumer name) and start the jobs read, per consumer."""
    by_stream = {c.stream: c for c in consumers}
    first = consumers[0]
    reply = first.redis.xreadgroup(
        GROUP, first.name, {s: ">" for s in by_stream}, count=count, block=block_ms
    )
    taken = []
    for stream, entries in reply or []:
        consumer = by_stream[_s(stream)]
        claimed = consumer.start([(_s(eid), data) for eid, data in entries])
        if claimed:
            taken.append((consumer, claimed))
    return taken
