"""``python -m app.worker``: serve a set of model variants on one device from their streams.

The variants are a registry worker's (``--worker NAME``, the ``[workers.NAME]`` table or the
default worker of a device) or named (``--serve MODEL/VARIANT ...``; ``--model M --variant V``
for one). They share the components they have in common (app.worker.components) and load
under the worker's memory budget (app.worker.residency): without a budget all of them at
start (warmed up); with one, those pinned at start and the others at their first job, the
least recently used evicted to make room. Jobs are taken from every variant's stream in turn,
up to ``T2I_BATCH_MAX`` of one variant (same size / steps / guidance) run as one pipeline
call (app.worker.batch). A variant
that cannot load fails its own jobs with the reason; the worker and the other variants go on.
SIGTERM or SIGINT: stop taking jobs, finish the current one, leave, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import threading
import time
import uuid
from dataclasses import replace

import redis
from prometheus_client import start_http_server

from app import metrics
from app.config import Settings, get_settings
from app.queue.connect import worker_client
from app.queue.consumer import Claimed, Consumer, take_any
from app.queue.keys import Keys
from app.registry import Registry, RegistryError, WorkerSpec, load_registry, parse_bytes
from app.worker import adapters, pipeline
from app.worker.batch import Results, run_batch
from app.worker.components import Components
from app.worker.residency import LoadFailed, Residency, Slot
from pipelines.lora import AdapterError as LoraError

log = logging.getLogger("app.worker")

TAKE_BLOCK_S = 1.0  # the longest a worker blocks on its streams before it looks around again

Key = tuple[str, str]  # (model, variant)
DENOISERS = ("unet", "transformer")


class Worker:
    def __init__(
        self, settings: Settings, registry: Registry, hosted: WorkerSpec, name: str
    ) -> None:
        self.settings, self.registry, self.hosted, self.name = settings, registry, hosted, name
        client = worker_client(settings, TAKE_BLOCK_S)
        self.consumers: dict[Key, Consumer] = {
            (m, v): Consumer(
                client,
                Keys(settings.key_prefix),
                model=m,
                variant=v,
                name=name,
                job_ttl_s=settings.job_ttl_s,
                reclaim_idle_s=settings.reclaim_idle_s,
                max_deliveries=settings.max_deliveries,
            )
            for m, v in hosted.variants
        }
        self.components = Components()
        self.residency: Residency[pipeline.Loaded] = Residency(
            self.components, hosted.memory_budget, hosted.pinned, self._published
        )
        self.stopping = threading.Event()
        self.holding: dict[Key, list[str]] = {}  # stream entries taken and not yet finished
        self.turn = 0  # the stream to look at first: the streams are served in turn
        self.device = hosted.device
        self.published: set[tuple[str, str, str]] = set()  # resident-bytes labels set so far
        self.adapters: dict[str, adapters.Adapters] = {}  # each hosted model's LoRA adapters

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Read and check the hosted models' LoRA adapters (``lora.AdapterError``, naming the
        file, stops the start), join the streams, load every variant (with a budget: those
        pinned) and warm them up, then start the heartbeats: a worker is live once it can
        serve."""
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        spec = self.registry.models[self.hosted.variants[0][0]]
        self.device = pipeline.pick_device(spec, self.settings.device or self.hosted.device)
        for model in dict.fromkeys(m for m, _ in self.hosted.variants):
            model_spec = self.registry.models[model]
            folder = pipeline.local_folder(model_spec.source)
            if model_spec.adapters and folder is None:
                raise LoraError(
                    f"{model}: its adapters are checked against {model_spec.source}, "
                    "which is not on disk"
                )
            self.adapters[model] = adapters.read_all(model_spec, folder) if folder else {}
            if self.adapters[model]:
                log.info(
                    "%s: LoRA adapters %s read and checked", model, ", ".join(self.adapters[model])
                )
        for consumer in self.consumers.values():
            consumer.ensure_group()
            dropped = consumer.reconcile()
            if dropped:
                log.info("dropped %d queued entries whose jobs can no longer run", dropped)
        budget = self.hosted.memory_budget
        for key in self.consumers:  # without a budget all of them; with one, those pinned
            if budget is None or key in self.hosted.pinned:
                with contextlib.suppress(LoadFailed):  # its jobs will get the reason
                    self.residency.get(self._slot(key))
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        log.info(
            "worker %s serves %s on %s (resident: %s)",
            self.name,
            ", ".join(f"{m}/{v}" for m, v in self.consumers),
            self.device,
            ", ".join(f"{m}/{v}" for m, v in self.residency.resident) or "none",
        )

    def _slot(self, key: Key) -> Slot[pipeline.Loaded]:
        spec = self.registry.models[key[0]]
        variant = spec.variants[key[1]]
        return Slot(
            key,
            load=lambda: self._load(key),
            needs=lambda: pipeline.estimate_bytes_needed(
                spec, variant, self.device, self.components
            ),
        )

    def _load(self, key: Key) -> pipeline.Loaded:
        """Load and warm up one variant (its jobs wait: their events say "loading")."""
        spec = self.registry.models[key[0]]
        variant = spec.variants[key[1]]
        labels = {"model": key[0], "variant": key[1]}
        loaded = pipeline.load(
            spec,
            variant,
            self.device,
            self.components,
            metadata=self.settings.image_metadata == "full",
            compile_cache=str(cache) if (cache := self.settings.compile_cache_dir) else None,
            adapters=self.adapters.get(key[0]),
        )
        t0 = time.perf_counter()
        pipeline.warm_up(loaded, spec, key[1], variant.compile)
        warm_up_s = time.perf_counter() - t0
        metrics.MODEL_LOAD_SECONDS.labels(**labels).set(loaded.load_seconds)
        metrics.MODEL_WARMUP_SECONDS.labels(**labels).set(warm_up_s)
        metrics.DENOISER_WEIGHT_BYTES.labels(**labels).set(loaded.denoiser_weight_bytes)
        metrics.VARIANT_INFO.labels(**labels, **variant.path()).set(1)
        log.info(
            "%s/%s on %s: loaded in %.1f s, warmed up%s in %.1f s",
            *key,
            loaded.device,
            loaded.load_seconds,
            " and compiled" if variant.compile else "",
            warm_up_s,
        )
        if variant.quantized:
            from quantization.artifact import bf16_layers_in_float, replays_with_fewer_codes

            if in_float := bf16_layers_in_float(variant.manifest):
                log.info(
                    "%s/%s: this CPU has no bf16 in hardware, so its %d bf16 layers multiply in "
                    "float32 (their weights stay bf16): float32's speed, and their outputs "
                    "closer to the float model's than a bf16 product",
                    *key,
                    in_float,
                )
            if replays_with_fewer_codes(variant.manifest):
                log.warning(
                    "%s/%s: its numbers were measured on a CPU with VNNI; this one has none, "
                    "so its int8 layers take 7-bit input codes and its fidelity is lower than "
                    "GET /v1/models says (python -m quantization evaluate measures it here)",
                    *key,
                )
        return loaded

    def _published(self, key: Key, loaded: pipeline.Loaded | None) -> None:
        """After a load or an eviction: resident bytes per component on /metrics (a model's
        own components shared by its variants under the variant ""), and the variant's
        residency in Redis for ``GET /v1/models``."""
        current: dict[tuple[str, str, str], int] = {}
        for identity, nbytes in self.components.bytes().items():
            users = sorted(self.components.users(identity))
            model = users[0].split("/", 1)[0]
            own = identity.component not in DENOISERS and (
                identity.source == self.registry.models[model].source
            )
            variant = "" if own else ",".join(u.split("/", 1)[1] for u in users)
            current[(model, variant, identity.component)] = nbytes
        for labels in self.published - current.keys():
            metrics.RESIDENT_BYTES.labels(*labels).set(0)
        for labels, nbytes in current.items():
            metrics.RESIDENT_BYTES.labels(*labels).set(nbytes)
        self.published |= current.keys()
        try:
            self.consumers[key].resident(None if loaded is None else loaded.denoiser_weight_bytes)
        except redis.RedisError as exc:  # written again at the next heartbeat
            log.warning("cannot publish the residency of %s/%s: %s", *key, exc)

    def _heartbeats(self) -> None:
        while True:
            for key, consumer in self.consumers.items():
                try:
                    consumer.heartbeat(list(self.holding.get(key, ())))
                    # both ways, so a write that raced an eviction is put right a beat later
                    loaded = self.residency.resident.get(key)
                    consumer.resident(None if loaded is None else loaded.denoiser_weight_bytes)
                except redis.RedisError as exc:
                    log.warning("heartbeat failed: %s", exc)
            time.sleep(self.settings.heartbeat_s)

    def serve(self) -> None:
        block_ms = int(min(TAKE_BLOCK_S, self.settings.heartbeat_s) * 1000)
        while not self.stopping.is_set():
            try:
                taken = self._take(block_ms)
            except redis.RedisError as exc:
                log.warning("cannot take jobs: %s", exc)
                time.sleep(1.0)
                if "NOGROUP" in str(exc):  # Redis lost its data (restarted without persistence)
                    with contextlib.suppress(redis.RedisError):
                        for consumer in self.consumers.values():
                            consumer.ensure_group()
                continue
            for key, claimed in taken:  # held until run: the heartbeat keeps them ours
                self.holding.setdefault(key, []).extend(c.stream_id for c in claimed)
            for key, claimed in taken:
                groups: dict[tuple, list[Claimed]] = {}
                for c in claimed:
                    groups.setdefault(c.job.request.batch_key(), []).append(c)
                for group in groups.values():
                    try:
                        self.run(key, group)
                    except redis.RedisError as exc:  # the jobs stay pending: taken over later
                        log.warning("left a batch to be taken over: %s", exc)
                    finally:
                        held = self.holding.get(key, [])
                        for c in group:
                            with contextlib.suppress(ValueError):
                                held.remove(c.stream_id)
        with contextlib.suppress(redis.RedisError):
            for consumer in self.consumers.values():
                consumer.leave()

    def _take(self, block_ms: int) -> list[tuple[Key, list[Claimed]]]:
        """Jobs of one variant, the streams looked at in turn (each first in its turn, so a
        busy variant does not starve the others). A variant that is not resident is taken in
        its turn only once its oldest job has waited as long as loading it takes (evicting
        another for one job at a time would thrash), or when no resident variant has work;
        when none has any, a wait on all at once."""
        keys = list(self.consumers)
        order = [keys[(self.turn + i) % len(keys)] for i in range(len(keys))]
        later = []
        for key in order:
            if not self._worth_loading(key):
                later.append(key)
                continue
            claimed = self.consumers[key].take(self.settings.batch_max, None)
            if claimed:
                self.turn = (keys.index(key) + 1) % len(keys)
                return [(key, claimed)]
        for key in later:  # nothing else to do: load it now
            claimed = self.consumers[key].take(self.settings.batch_max, None)
            if claimed:
                self.turn = (keys.index(key) + 1) % len(keys)
                return [(key, claimed)]
        consumers = list(self.consumers.values())
        taken = take_any(consumers, self.settings.batch_max, block_ms)
        return [((c.model, c.variant), claimed) for c, claimed in taken]

    def _worth_loading(self, key: Key) -> bool:
        """Resident, or its oldest queued job has waited as long as its last load took."""
        if self.hosted.memory_budget is None or key in self.residency.resident:
            return True
        waited = self.consumers[key].oldest_wait()
        return waited is not None and waited >= self.residency.load_cost(key)

    # --- one batch -----------------------------------------------------------------------------

    def run(self, key: Key, group: list[Claimed]) -> None:
        """Run one batch of a variant, loading the variant first when it is not resident."""
        consumer = self.consumers[key]
        results = Results(consumer, self.stopping)

        def loading() -> None:
            with contextlib.suppress(redis.RedisError):  # a courtesy: the load goes on
                consumer.loading(group)

        try:
            loaded = self.residency.get(self._slot(key), on_loading=loading)
        except LoadFailed as exc:
            results.fail(group, str(exc), exc.code)
            return
        spec = self.registry.models[key[0]]
        run_batch(group, loaded, spec, results, self.settings, self.name)


def hosted_by(args: argparse.Namespace, registry: Registry) -> WorkerSpec:
    """What the command line asks this process to host; ValueError naming what is wrong."""
    if args.model:
        spec = registry.get(args.model)
        if spec is None:
            raise ValueError(
                f"unknown model {args.model!r}; the registry has {', '.join(registry.models)}"
            )
        variant = args.variant or spec.default_variant
        if variant not in spec.variants:
            raise ValueError(
                f"{args.model} has no variant {variant!r}; it has {', '.join(spec.variants)}"
            )
        hosted = WorkerSpec(f"{args.model}/{variant}", spec.device, ((args.model, variant),))
    elif args.serve:
        served = registry.served()
        unknown = [t for t in args.serve if tuple(t.split("/", 1)) not in served]
        if unknown:
            raise ValueError(f"not in the registry: {', '.join(unknown)}")
        chosen = [t for t in served if f"{t[0]}/{t[1]}" in args.serve]
        devices = {registry.models[m].device for m, _ in chosen}
        if len(devices) > 1:
            raise ValueError(f"one worker serves one device; these run on {sorted(devices)}")
        hosted = WorkerSpec("serve", devices.pop(), tuple(chosen))
    else:
        name = args.worker or (next(iter(registry.workers)) if len(registry.workers) == 1 else None)
        if name is None or name not in registry.workers:
            raise ValueError(
                f"name a worker of the registry with --worker ({', '.join(registry.workers)}), "
                "or the variants with --serve MODEL/VARIANT ..."
            )
        hosted = registry.workers[name]
    if args.memory_budget is not None:
        hosted = replace(hosted, memory_budget=parse_bytes(args.memory_budget))
    return hosted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.worker", description=__doc__.split("\n")[0]
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--worker", help="a [workers.NAME] of the registry (default: its only one)")
    what.add_argument("--serve", nargs="+", metavar="MODEL/VARIANT", help="these variants")
    what.add_argument("--model", help="one variant of this model (with --variant)")
    parser.add_argument("--variant", help="with --model; default: the model's default variant")
    parser.add_argument(
        "--memory-budget", help="bytes of weights held at once, e.g. 2GiB (default: registry's)"
    )
    parser.add_argument("--name", help="consumer name (default: host-pid-random)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default: settings)")
    args = parser.parse_args(argv)
    if args.variant and not args.model:
        parser.error("--variant goes with --model")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    try:
        registry = load_registry(settings.registry)
        hosted = hosted_by(args, registry)
    except (RegistryError, ValueError) as exc:
        parser.error(str(exc))
    name = args.name or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        start_http_server(port)
    worker = Worker(settings, registry, hosted, name)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stopping.set())
    try:
        worker.start()
    except LoraError as exc:  # a tampered or mismatched adapter: nothing is served
        log.critical("cannot start: %s", exc)
        return 2
    worker.serve()
    log.info("worker %s stopped", name)
    return 0
