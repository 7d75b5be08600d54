"""What the service adds to a generation, and what batching gains.

    python -m bench.service_overhead [--runs 20]

Overhead: for the same job (model, prompt, seed, steps), the median latency of
``POST /v1/images/generations`` through HTTP, Redis and a worker, minus the median of the same
pipeline call made directly in this process (same torch thread count), one job at a time.
Batching: 16 jobs submitted at once to one worker with T2I_BATCH_MAX=1 and =4; jobs per second
from the first submission to the last completion.
Writes bench/results/service-overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import httpx

from bench.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
CASES = [  # model, prompt, steps
    ("dit-digits", "seven", 20),
    ("t2i-digits", "a red seven on a black background", 20),
]


def _direct_ms(model: str, prompt: str, steps: int, runs: int) -> float:
    import torch

    from app.config import get_settings
    from app.queue.records import JobRequest
    from app.registry import load_registry
    from app.worker import pipeline

    torch.set_num_threads(THREADS)
    spec = load_registry(get_settings().registry).get(model)
    loaded = pipeline.load(spec, spec.variants["fp32"], "cpu")
    request = JobRequest(
        model=model,
        variant="fp32",
        prompt=prompt,
        n=1,
        width=32,
        height=32,
        steps=steps,
        guidance_scale=spec.guidance,
        seed=0,
        class_id=spec.class_id(prompt),
    )
    times = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        pipeline.run_batch(loaded, spec, [request], lambda *_: None)
        if i >= 3:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _service_ms(http: httpx.Client, model: str, prompt: str, steps: int, runs: int) -> float:
    body = {"model": model, "prompt": prompt, "steps": steps, "seed": 0}
    times = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        http.post("/v1/images/generations", json=body).raise_for_status()
        if i >= 3:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _throughput(http: httpx.Client, model: str, prompt: str, steps: int, jobs: int) -> float:
    t0 = time.perf_counter()
    ids = [
        http.post(
            "/v1/jobs", json={"model": model, "prompt": prompt, "steps": steps, "seed": i}
        ).json()["id"]
        for i in range(jobs)
    ]
    pending = set(ids)
    while pending:
        pending = {j for j in pending if http.get(f"/v1/jobs/{j}").json()["status"] != "completed"}
        time.sleep(0.01)
    return jobs / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.service_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "service-overhead.json")
    args = parser.parse_args(argv)
    rows = []
    for model, prompt, steps in CASES:
        direct = _direct_ms(model, prompt, steps, args.runs)
        stack = Stack(torch_threads=THREADS)
        try:
            http = httpx.Client(base_url=stack.url, timeout=120)
            stack.start_worker("w1", model, "fp32")
            service = _service_ms(http, model, prompt, steps, args.runs)
            single = _throughput(http, model, prompt, steps, 16)
            stack.stop_worker("w1")
            stack.start_worker("w4", model, "fp32", batch_max=4)
            batched = _throughput(http, model, prompt, steps, 16)
        finally:
            stack.close()
        row = {
            "model": model,
            "variant": "fp32",
            "steps": steps,
            "direct_ms_median": round(direct, 2),
            "service_ms_median": round(service, 2),
            "overhead_ms": round(service - direct, 2),
            "jobs_per_s_batch_1": round(single, 2),
            "jobs_per_s_batch_4": round(batched, 2),
            "batching_gain": round(batched / single, 2),
        }
        print(json.dumps(row))
        rows.append(row)
    record = {
        "command": "python -m bench.service_overhead",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "torch_threads": THREADS,
        "runs": args.runs,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
