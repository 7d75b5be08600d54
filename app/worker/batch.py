"""One batch of jobs of one variant through its loaded pipeline, and the writing of results.

Per step it records progress and checks for cancellation; a pipeline error or out-of-memory
fails the batch's jobs and not the worker. A Redis fault is never a job failure: progress that
cannot be written is written later, and a result waits for Redis to answer (the job stays
pending meanwhile, so if this worker dies another one takes it over).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
from collections.abc import Callable

import redis

from app import metrics
from app.config import Settings
from app.queue.consumer import Claimed, Consumer
from app.queue.records import JobStatus
from app.registry import ModelSpec
from app.worker import pipeline

__all__ = ["Cancelled", "Results", "run_batch"]

log = logging.getLogger("app.worker.batch")

PROGRESS_FLUSH_S = 0.1  # the longest a step's progress event (and a cancel check) waits
REDIS_RETRY_S = 1.0  # pause between attempts to write a result while Redis does not answer
GIVE_UP_WHEN_STOPPING_S = 10.0  # stopping, a result Redis will not take is left for reclaim


class Cancelled(Exception):
    """Every job of the running batch was asked to stop."""


class Results:
    """Writes jobs' ends through a consumer, retrying while Redis does not answer."""

    def __init__(self, consumer: Consumer, stopping: threading.Event) -> None:
        self.consumer, self.stopping = consumer, stopping
        self.labels = {"model": consumer.model, "variant": consumer.variant}

    def finish(self, c: Claimed, status: JobStatus, **kwargs) -> None:
        outcome = self.until_written(
            lambda: self.consumer.finish(c.job.id, c.stream_id, status, **kwargs)
        )
        if outcome == "ok":
            metrics.JOBS.labels(**self.labels, status=status.value).inc()

    def fail(self, group: list[Claimed], error: str, code: str) -> None:
        for c in group:
            self.finish(c, JobStatus.FAILED, error=error, error_code=code)

    def until_written(self, write: Callable):
        """``write()`` once Redis takes it: a result is not thrown away because Redis stalled.
        Both writes are idempotent (a result stored twice is the same; FINISH of a finished
        job is a no-op), so a write that timed out but ran is harmless to repeat. When the
        worker is stopping it gives up after a while; the job stays pending for reclaim."""
        gave_up_at = None
        while True:
            try:
                return write()
            except redis.RedisError as exc:
                if self.stopping.is_set():
                    gave_up_at = gave_up_at or time.monotonic() + GIVE_UP_WHEN_STOPPING_S
                    if time.monotonic() > gave_up_at:
                        raise
                log.warning("Redis does not take a result yet (%s); retrying", exc)
                time.sleep(REDIS_RETRY_S)


def run_batch(
    group: list[Claimed],
    loaded: pipeline.Loaded,
    spec: ModelSpec,
    results: Results,
    settings: Settings,
    worker_name: str,
) -> None:
    """Run one batch (jobs of one variant sharing a batch key) and write its results."""
    consumer, labels = results.consumer, results.labels
    device = loaded.device
    cancelled: set[str] = set()
    step_times: list[float] = []
    unreported: list[int] = []
    last = flushed = time.perf_counter()

    def on_step(step: int, steps: int) -> None:
        nonlocal last, flushed
        if settings.step_delay_s:
            time.sleep(settings.step_delay_s)
        now = time.perf_counter()
        step_times.append(now - last)
        metrics.STEP_SECONDS.labels(**labels).observe(now - last)
        last = now
        unreported.append(step)
        # Every step gets its event, but fast steps are written together, at most one
        # round trip per PROGRESS_FLUSH_S: Redis work beside a 2-thread step slows it.
        if now - flushed >= PROGRESS_FLUSH_S or step == steps:
            flushed = now
            try:
                cancelled.update(consumer.progress(group, unreported, steps))
            except redis.RedisError as exc:  # kept, and written at the next flush
                log.warning("cannot write progress (step %d): %s", step, exc)
                return
            unreported.clear()
            if len(cancelled) == len(group):
                raise Cancelled

    def on_preview(index: int, step: int, previews: list[list[bytes]]) -> None:
        try:  # a preview is a courtesy: a Redis fault costs it, not the job
            consumer.store_previews(
                index, step, {c.job.id: p for c, p in zip(group, previews, strict=True)}
            )
        except redis.RedisError as exc:
            log.warning("cannot store preview %d: %s", index, exc)

    first = group[0].job.request
    inputs = {}
    if first.image is not None:
        inputs = {"image": consumer.upload(first.image)}
        inputs["mask"] = consumer.upload(first.mask) if first.mask else None
        if inputs["image"] is None or (first.mask and inputs["mask"] is None):
            results.fail(group, "the input image has expired; send it again", "input_expired")
            return
    for c in group:
        metrics.QUEUE_WAIT_SECONDS.labels(**labels).observe(
            max(0.0, (c.job.started_at or time.time()) - c.job.created_at)
        )
    metrics.BATCH_SIZE.labels(**labels).observe(len(group))
    pipeline.reset_peak_memory(device)
    t0 = time.perf_counter()
    try:
        outputs = pipeline.run_batch(
            loaded,
            spec,
            [c.job.request for c in group],
            on_step,
            **inputs,
            on_preview=on_preview if first.partial_images else None,
        )
    except Cancelled:
        for c in group:
            results.finish(
                c, JobStatus.CANCELLED, error="cancelled while running", error_code="cancelled"
            )
        return
    except Exception as exc:  # any pipeline failure fails the jobs, not the worker
        message = describe(exc)
        log.error("batch of %d failed: %s", len(group), message)
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        results.fail(group, message, "generation_failed")
        return
    seconds = time.perf_counter() - t0
    if unreported:  # the last flush failed: one more try; the final status follows anyway
        with contextlib.suppress(redis.RedisError):
            consumer.progress(group, unreported, first.steps_run)
    kind, peak = pipeline.peak_memory(device)
    metrics.PEAK_MEMORY_BYTES.labels(**labels, kind=kind).set(peak)
    for c, out in zip(group, outputs, strict=True):
        if c.job.id in cancelled:
            results.finish(
                c, JobStatus.CANCELLED, error="cancelled while running", error_code="cancelled"
            )
            continue
        results.until_written(
            lambda c=c, out=out: consumer.store_images(c.job.id, out.images, out.latents.tobytes())
        )
        result = {
            "seed": c.job.request.seed,
            "inference_s": round(seconds, 4),
            "step_ms_median": round(1000 * statistics.median(step_times), 3)
            if step_times
            else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "denoiser_weight_bytes": loaded.denoiser_weight_bytes,
            "batch_jobs": len(group),
            "latents_shape": list(out.latents.shape),
            "device": device,
            "worker": worker_name,
        }
        metrics.GENERATION_SECONDS.labels(**labels).observe(seconds)
        metrics.IMAGES.labels(**labels).inc(len(out.images))
        results.finish(
            c, JobStatus.COMPLETED, images=len(out.images), result=result, duration=seconds
        )


def describe(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return f"out of memory: {exc}".strip()
    return f"{name}: {exc}"
