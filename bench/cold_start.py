"""Cold start: what the first request after idle costs when workers scale to zero.

    python -m bench.cold_start [--repeats 3] [--only MODEL/VARIANT ...] [--compile]

For each variant of the registry (models/registry.toml, or those named with --only), with no
worker of it running: one job goes in through the API (the model's default steps), then one
worker starts. Recorded per run: the worker's start to its first heartbeat (process start,
imports, model load, warm-up), the model load alone (the worker's gauge), the job's
submission to its completion (what the first request after idle waits) and the job's own
inference time; --repeats runs each, and their medians. Writes bench/results/cold-start.json.

With --compile the chosen variants run as compiled variants (registry ``compile = true``) that
share one fresh compile cache (``T2I_COMPILE_CACHE_DIR``): each variant's first run compiles
from nothing, the later ones find its code in the cache, as a restarted worker does. Also
recorded: the warm-up (``t2i_model_warmup_seconds``). Writes
bench/results/cold-start-compiled.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from app.config import Settings
from app.queue.keys import Keys
from app.registry import Registry, load_registry
from bench.record import save
from bench.scrape import samples
from bench.stack import Stack, free_port, wait_for

RESULTS = Path(__file__).resolve().parent / "results"
TIMEOUT_S = 300.0  # a worker start or a job taking longer is a failure, not a measurement
POLL_S = 0.01  # well under a heartbeat period, so the first heartbeat is the one seen
MEASURES = (
    "worker_start_to_heartbeat_s",
    "model_load_s",
    "warm_up_s",
    "first_job_total_s",
    "inference_s",
)


def pick(registry: Registry, only: list[str] | None) -> list[tuple[str, str]]:
    """(model, variant) pairs: every one of the registry, or those of ``only`` ("M/V")."""
    every = [(m, v) for m, spec in registry.models.items() for v in spec.variants]
    if not only:
        return every
    chosen = []
    for item in only:
        model, _, variant = item.partition("/")
        if (model, variant) not in every:
            names = ", ".join(f"{m}/{v}" for m, v in every)
            raise SystemExit(f"no variant {item!r} in the registry; it has {names}")
        chosen.append((model, variant))
    return chosen


def medians(runs: list[dict]) -> dict[str, float | None]:
    """The median of each measure over the runs (None where no run has it)."""
    out: dict[str, float | None] = {}
    for measure in MEASURES:
        values = [r[measure] for r in runs if r.get(measure) is not None]
        out[measure] = round(statistics.median(values), 3) if values else None
    return out


def gauge(text: str, name: str, model: str, variant: str) -> float | None:
    """One sample of a Prometheus text exposition, by metric name and model/variant labels."""
    for labels, value in samples(text, name):
        if labels.get("model") == model and labels.get("variant") == variant:
            return value
    return None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _beat(stack: Stack, key: str, name: str, since: float) -> float | None:
    """The time of worker ``name``'s heartbeat if it is one from ``since`` on."""
    score = stack.redis.zscore(key, name)
    return score if score is not None and score >= since else None


def _finished(http: httpx.Client, job_id: str) -> dict | None:
    view = http.get(f"/v1/jobs/{job_id}").json()
    return view if view["status"] in ("completed", "failed", "cancelled") else None


def cold_start(
    stack: Stack, http: httpx.Client, model: str, variant: str, name: str, prompt: str
) -> dict:
    """One run: submit with no worker live, start one, time its first heartbeat and the job."""
    response = http.post("/v1/jobs", json={"model": model, "variant": variant, "prompt": prompt})
    if response.status_code != 202:
        raise SystemExit(f"{model}/{variant}: {response.status_code} {response.text}")
    job_id = response.json()["id"]
    port, key = free_port(), Keys(stack.prefix).workers(model, variant)
    load = os.getloadavg()[0]  # other work on this machine shows here, and in the times
    started = time.time()
    stack.start_worker(name, model, variant, wait=False, metrics_port=port)
    try:
        heartbeat = wait_for(
            lambda: _beat(stack, key, name, started), TIMEOUT_S, f"heartbeat of {name}", POLL_S
        )
        view = wait_for(lambda: _finished(http, job_id), TIMEOUT_S, f"end of job {job_id}", POLL_S)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        stack.stop_worker(name)
    if view["status"] != "completed":
        raise SystemExit(f"{model}/{variant}: job {view['status']}: {view['error']}")
    timings = view["timings"]
    return {
        "worker_start_to_heartbeat_s": round(heartbeat - started, 3),
        "model_load_s": _rounded(gauge(metrics, "t2i_model_load_seconds", model, variant)),
        "warm_up_s": _rounded(gauge(metrics, "t2i_model_warmup_seconds", model, variant)),
        "first_job_total_s": timings["total_s"],
        "queue_wait_s": timings["queue_wait_s"],
        "inference_s": timings["inference_s"],
        "steps": view["steps"],
        "load_1m_before": round(load, 2),
    }


def compiled_registry(registry: Registry, chosen: list[tuple[str, str]]) -> str:
    """A registry (TOML text) of the chosen variants with ``compile = true``; paths absolute,
    so it works from any folder."""
    lines = []
    for model in dict.fromkeys(m for m, _ in chosen):
        spec = registry.models[model]
        lines += [
            f"[models.{model}]",
            f"source = {json.dumps(spec.source)}",
            f"kind = {json.dumps(spec.kind)}",
            f"sizes = {json.dumps(list(spec.sizes))}",
            f"default_steps = {spec.default_steps}",
            f"max_steps = {spec.max_steps}",
            f"guidance = {spec.guidance}",
        ]
        for m, name in chosen:
            if m != model:
                continue
            variant = spec.variants[name]
            lines.append(f"[models.{model}.variants.{name}]")
            if variant.quantized:
                lines.append(f"artifact = {json.dumps(str(variant.artifact))}")
            else:
                lines.append(f"dtype = {json.dumps(variant.dtype)}")
            lines.append("compile = true")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cold_start", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", metavar="MODEL/VARIANT")
    parser.add_argument("--compile", action="store_true", help="as compiled variants")
    parser.add_argument(
        "--out", type=Path, help="default: bench/results/cold-start[-compiled].json"
    )
    args = parser.parse_args(argv)
    out = args.out or RESULTS / ("cold-start-compiled.json" if args.compile else "cold-start.json")
    registry = load_registry(Settings().registry)
    chosen = pick(registry, args.only)
    results = []
    settings = {}
    if args.compile:
        folder = Path(tempfile.mkdtemp(prefix="t2i-compile-"))
        (folder / "registry.toml").write_text(compiled_registry(registry, chosen))
        settings = {"registry": folder / "registry.toml", "compile_cache_dir": folder / "cache"}
    stack = Stack(**settings)
    try:
        http = httpx.Client(base_url=stack.url, timeout=30)
        for model, variant in chosen:
            spec = registry.models[model]
            prompt = spec.shadow_prompt or next(iter(spec.labels), "seven")
            runs = []
            for i in range(args.repeats):
                run = cold_start(stack, http, model, variant, f"cold-{model}-{variant}-{i}", prompt)
                print(json.dumps({"model": model, "variant": variant, **run}))
                runs.append(run)
            results.append(
                {
                    "model": model,
                    "variant": variant,
                    "steps": runs[0]["steps"],
                    "median": medians(runs),
                    "runs": runs,
                }
            )
    finally:
        stack.close()
    save(
        out,
        "python -m bench.cold_start" + (" --compile" if args.compile else ""),
        repeats=args.repeats,
        compiled=args.compile,
        torch_threads="torch's default",
        variants=results,
    )


if __name__ == "__main__":
    main()
