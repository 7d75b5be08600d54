"""What the service adds to a generation, and what batching gains.

    python -m bench.service_overhead [--runs 20]

Overhead: for the same job (model, prompt, seed, steps), the median latency of
``POST /v1/images/generations`` through HTTP, Redis and a worker, minus the median of the same
pipeline call made directly in this process (same torch thread count), the two alternating,
one job at a time. Also the median of (HTTP latency - the worker's own inference time), what
the service adds around the pipeline call without comparing two processes.
Batching: 16 jobs submitted at once to one worker with T2I_BATCH_MAX=1 and =4; jobs per second
from the first submission to the last completion.
Writes bench/results/service-overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from bench.record import save
from bench.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
CASES = [  # model, prompt, steps
    ("dit-digits", "seven", 20),
    ("t2i-digits", "a red seven on a black background", 20),
]


def _latencies(http: httpx.Client, model: str, prompt: str, steps: int, runs: int) -> dict:
    """The same job, alternately called directly here and through the service, so that drift
    of the machine hits both alike; medians over ``runs`` after 3 warm-up pairs."""
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
    body = {"model": model, "prompt": prompt, "steps": steps, "seed": 0}
    direct, service, outside_worker = [], [], []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        pipeline.run_batch(loaded, spec, [request], lambda *_: None)
        t1 = time.perf_counter()
        response = http.post("/v1/images/generations", json=body)
        t2 = time.perf_counter()
        response.raise_for_status()
        if i >= 3:
            direct.append(1000 * (t1 - t0))
            service.append(1000 * (t2 - t1))
            outside_worker.append(1000 * (t2 - t1 - response.json()["timings"]["inference_s"]))
    return {
        "direct_ms_median": round(statistics.median(direct), 2),
        "service_ms_median": round(statistics.median(service), 2),
        "overhead_ms": round(statistics.median(service) - statistics.median(direct), 2),
        "outside_worker_ms_median": round(statistics.median(outside_worker), 2),
    }


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
        stack = Stack(torch_threads=THREADS)
        try:
            http = httpx.Client(base_url=stack.url, timeout=120)
            stack.start_worker("w1", model, "fp32")
            latency = _latencies(http, model, prompt, steps, args.runs)
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
            **latency,
            "jobs_per_s_batch_1": round(single, 2),
            "jobs_per_s_batch_4": round(batched, 2),
            "batching_gain": round(batched / single, 2),
        }
        print(json.dumps(row))
        rows.append(row)
    save(
        args.out,
        "python -m bench.service_overhead",
        torch_threads=THREADS,
        runs=args.runs,
        rows=rows,
    )


if __name__ == "__main__":
    main()
