"""``python -m app.worker --model NAME --variant V``: serve one model variant from its stream.

Loads the pipeline once, warms it up, then takes jobs (up to ``T2I_BATCH_MAX`` of the same
size / steps / guidance run as one pipeline call). Per step it records progress and checks
for cancellation; a pipeline error or out-of-memory fails that job and the worker lives on.
A Redis fault is never a job failure: progress that cannot be written is written later, and
the result waits for Redis to answer (the job stays pending meanwhile, so if this worker dies
another one takes it over).
SIGTERM or SIGINT: stop taking jobs, finish the current one, leave, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import statistics
import threading
import time
import uuid

import redis
from prometheus_client import start_http_server

from app import metrics
from app.config import Settings, get_settings
from app.queue.connect import worker_client
from app.queue.consumer import Claimed, Consumer
from app.queue.keys import Keys
from app.queue.records import JobStatus
from app.registry import ModelSpec, RegistryError, load_registry
from app.worker import pipeline

log = logging.getLogger("app.worker")

PROGRESS_FLUSH_S = 0.1  # the longest a step's progress event (and a cancel check) waits
TAKE_BLOCK_S = 1.0  # the longest a worker blocks on its stream before it looks around again
REDIS_RETRY_S = 1.0  # pause between attempts to write a result while Redis does not answer
GIVE_UP_WHEN_STOPPING_S = 10.0  # stopping, a result Redis will not take is left for reclaim


class Cancelled(Exception):
    """Every job of the running batch was asked to stop."""


class Worker:
    def __init__(self, settings: Settings, spec: ModelSpec, variant: str, name: str) -> None:
        self.settings, self.spec, self.variant, self.name = settings, spec, variant, name
        self.labels = {"model": spec.name, "variant": variant}
        self.consumer = Consumer(
            worker_client(settings, TAKE_BLOCK_S),
            Keys(settings.key_prefix),
            model=spec.name,
            variant=variant,
            name=name,
            job_ttl_s=settings.job_ttl_s,
            reclaim_idle_s=settings.reclaim_idle_s,
            max_deliveries=settings.max_deliveries,
        )
        self.stopping = threading.Event()
        self.holding: list[str] = []  # stream entries of the running batch
        self.loaded: pipeline.Loaded | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self.consumer.ensure_group()
        dropped = self.consumer.reconcile()
        if dropped:
            log.info("dropped %d queued entries whose jobs can no longer run", dropped)
        self.loaded = pipeline.load(
            self.spec,
            self.spec.variants[self.variant],
            pipeline.pick_device(self.spec, self.settings.device),
            metadata=self.settings.image_metadata == "full",
            compile_cache=str(cache) if (cache := self.settings.compile_cache_dir) else None,
        )
        metrics.MODEL_LOAD_SECONDS.labels(**self.labels).set(self.loaded.load_seconds)
        metrics.DENOISER_WEIGHT_BYTES.labels(**self.labels).set(self.loaded.denoiser_weight_bytes)
        variant = self.spec.variants[self.variant]
        metrics.VARIANT_INFO.labels(**self.labels, **variant.path()).set(1)
        compiled = variant.compile
        t0 = time.perf_counter()
        pipeline.warm_up(self.loaded, self.spec, self.variant, compiled)
        warm_up_s = time.perf_counter() - t0
        metrics.MODEL_WARMUP_SECONDS.labels(**self.labels).set(warm_up_s)
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        log.info(
            "worker %s serves %s/%s on %s (loaded in %.1f s, warmed up%s in %.1f s)",
            self.name,
            self.spec.name,
            self.variant,
            self.loaded.device,
            self.loaded.load_seconds,
            " and compiled" if compiled else "",
            warm_up_s,
        )

    def _heartbeats(self) -> None:
        while True:
            try:
                self.consumer.heartbeat(list(self.holding))
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            time.sleep(self.settings.heartbeat_s)

    def serve(self) -> None:
        block_ms = int(min(TAKE_BLOCK_S, self.settings.heartbeat_s) * 1000)
        while not self.stopping.is_set():
            try:
                claimed = self.consumer.take(self.settings.batch_max, block_ms)
            except redis.RedisError as exc:
                log.warning("cannot take jobs: %s", exc)
                time.sleep(1.0)
                if "NOGROUP" in str(exc):  # Redis lost its data (restarted without persistence)
                    with contextlib.suppress(redis.RedisError):
                        self.consumer.ensure_group()
                continue
            groups: dict[tuple, list[Claimed]] = {}
            for c in claimed:
                groups.setdefault(c.job.request.batch_key(), []).append(c)
            for group in groups.values():
                try:
                    self.run(group)
                except redis.RedisError as exc:  # the jobs stay pending: taken over later
                    log.warning("left a batch to be taken over: %s", exc)
        with contextlib.suppress(redis.RedisError):
            self.consumer.leave()

    # --- one batch -----------------------------------------------------------------------------

    def run(self, group: list[Claimed]) -> None:
        """Run one batch and write its results. Its entries are held (their idle time reset by
        the heartbeat) until the results are written, however long Redis takes to answer."""
        self.holding = [c.stream_id for c in group]
        try:
            self._run(group)
        finally:
            self.holding = []

    def _run(self, group: list[Claimed]) -> None:
        device = self.loaded.device
        cancelled: set[str] = set()
        step_times: list[float] = []
        unreported: list[int] = []
        last = flushed = time.perf_counter()

        def on_step(step: int, steps: int) -> None:
            nonlocal last, flushed
            if self.settings.step_delay_s:
                time.sleep(self.settings.step_delay_s)
            now = time.perf_counter()
            step_times.append(now - last)
            metrics.STEP_SECONDS.labels(**self.labels).observe(now - last)
            last = now
            unreported.append(step)
            # Every step gets its event, but fast steps are written together, at most one
            # round trip per PROGRESS_FLUSH_S: Redis work beside a 2-thread step slows it.
            if now - flushed >= PROGRESS_FLUSH_S or step == steps:
                flushed = now
                try:
                    cancelled.update(self.consumer.progress(group, unreported, steps))
                except redis.RedisError as exc:  # kept, and written at the next flush
                    log.warning("cannot write progress (step %d): %s", step, exc)
                    return
                unreported.clear()
                if len(cancelled) == len(group):
                    raise Cancelled

        def on_preview(index: int, step: int, previews: list[list[bytes]]) -> None:
            try:  # a preview is a courtesy: a Redis fault costs it, not the job
                self.consumer.store_previews(
                    index, step, {c.job.id: p for c, p in zip(group, previews, strict=True)}
                )
            except redis.RedisError as exc:
                log.warning("cannot store preview %d: %s", index, exc)

        first = group[0].job.request
        inputs = {}
        if first.image is not None:
            inputs = {"image": self.consumer.upload(first.image)}
            inputs["mask"] = self.consumer.upload(first.mask) if first.mask else None
            if inputs["image"] is None or (first.mask and inputs["mask"] is None):
                for c in group:
                    self._finish(
                        c,
                        JobStatus.FAILED,
                        error="the input image has expired; send it again",
                        error_code="input_expired",
                    )
                return
        for c in group:
            metrics.QUEUE_WAIT_SECONDS.labels(**self.labels).observe(
                max(0.0, (c.job.started_at or time.time()) - c.job.created_at)
            )
        metrics.BATCH_SIZE.labels(**self.labels).observe(len(group))
        pipeline.reset_peak_memory(device)
        t0 = time.perf_counter()
        try:
            outputs = pipeline.run_batch(
                self.loaded,
                self.spec,
                [c.job.request for c in group],
                on_step,
                **inputs,
                on_preview=on_preview if first.partial_images else None,
            )
        except Cancelled:
            for c in group:
                self._finish(
                    c, JobStatus.CANCELLED, error="cancelled while running", error_code="cancelled"
                )
            return
        except Exception as exc:  # any pipeline failure fails the jobs, not the worker
            message = _describe(exc)
            log.error("batch of %d failed: %s", len(group), message)
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            for c in group:
                self._finish(c, JobStatus.FAILED, error=message, error_code="generation_failed")
            return
        seconds = time.perf_counter() - t0
        if unreported:  # the last flush failed: one more try; the final status follows anyway
            with contextlib.suppress(redis.RedisError):
                self.consumer.progress(group, unreported, first.steps_run)
        kind, peak = pipeline.peak_memory(device)
        metrics.PEAK_MEMORY_BYTES.labels(**self.labels, kind=kind).set(peak)
        for c, out in zip(group, outputs, strict=True):
            if c.job.id in cancelled:
                self._finish(
                    c, JobStatus.CANCELLED, error="cancelled while running", error_code="cancelled"
                )
                continue
            self._until_written(
                lambda c=c, out=out: self.consumer.store_images(
                    c.job.id, out.images, out.latents.tobytes()
                )
            )
            result = {
                "seed": c.job.request.seed,
                "inference_s": round(seconds, 4),
                "step_ms_median": round(1000 * statistics.median(step_times), 3)
                if step_times
                else None,
                "peak_memory_bytes": peak,
                "peak_memory_kind": kind,
                "denoiser_weight_bytes": self.loaded.denoiser_weight_bytes,
                "batch_jobs": len(group),
                "latents_shape": list(out.latents.shape),
                "device": device,
                "worker": self.name,
            }
            metrics.GENERATION_SECONDS.labels(**self.labels).observe(seconds)
            metrics.IMAGES.labels(**self.labels).inc(len(out.images))
            self._finish(
                c, JobStatus.COMPLETED, images=len(out.images), result=result, duration=seconds
            )

    def _finish(self, c: Claimed, status: JobStatus, **kwargs) -> None:
        outcome = self._until_written(
            lambda: self.consumer.finish(c.job.id, c.stream_id, status, **kwargs)
        )
        if outcome == "ok":
            metrics.JOBS.labels(**self.labels, status=status.value).inc()

    def _until_written(self, write):
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


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return f"out of memory: {exc}".strip()
    return f"{name}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", help="default: the model's default variant")
    parser.add_argument("--name", help="consumer name (default: host-pid-random)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default: settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    try:
        registry = load_registry(settings.registry)
    except RegistryError as exc:
        parser.error(str(exc))
    spec = registry.get(args.model)
    if spec is None:
        parser.error(f"unknown model {args.model!r}; the registry has {', '.join(registry.models)}")
    variant = args.variant or spec.default_variant
    if variant not in spec.variants:
        parser.error(f"{args.model} has no variant {variant!r}; it has {', '.join(spec.variants)}")
    name = args.name or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        start_http_server(port)
    worker = Worker(settings, spec, variant, name)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stopping.set())
    worker.start()
    worker.serve()
    log.info("worker %s stopped", name)
    return 0
