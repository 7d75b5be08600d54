"""Load test of the running service: throughput and latency with 1 and 2 workers, and what
happens at saturation.

    python -m bench.load_test [--seconds 30] [--model dit-digits]

For 1 and then 2 workers of one variant (each with one torch thread, so two workers can use
this machine's two cores): closed-loop clients (1 and 4) calling POST /v1/images/generations
back to back for ``--seconds`` -> images/s and latency percentiles; then a burst of 100
POST /v1/jobs at once against a queue bounded at 16 -> how many are accepted (202), pushed back
(429 with Retry-After) or fail (5xx, must be none), and whether every accepted job completes
(none lost). Writes bench/results/load-test.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from bench.record import save
from bench.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
QUEUE_MAX = 16
BURST = 100


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _closed_loop(url: str, body: dict, clients: int, seconds: float) -> dict:
    latencies, errors = [], 0
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            response = await http.post("/v1/images/generations", json=body)
            if response.status_code == 200:
                latencies.append(1000 * (time.perf_counter() - t0))
            else:
                errors += 1

    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.monotonic() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "images_per_s": round(len(latencies) / wall, 2),
        "latency_ms_p50": round(statistics.median(latencies), 1),
        "latency_ms_p95": round(_percentile(latencies, 0.95), 1),
        "latency_ms_p99": round(_percentile(latencies, 0.99), 1),
    }


async def _saturation(url: str, body: dict) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        responses = await asyncio.gather(
            *(http.post("/v1/jobs", json={**body, "seed": i}) for i in range(BURST))
        )
        accepted = [r.json()["id"] for r in responses if r.status_code == 202]
        pushed_back = [r for r in responses if r.status_code == 429]
        retry_after = sorted({int(r.headers["retry-after"]) for r in pushed_back})
        pending = set(accepted)
        finished: dict[str, str] = {}
        deadline = time.monotonic() + 300
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                status = (await http.get(f"/v1/jobs/{job_id}")).json()["status"]
                if status in ("completed", "failed", "cancelled"):
                    finished[job_id] = status
                    pending.discard(job_id)
            await asyncio.sleep(0.2)
    return {
        "burst": BURST,
        "queue_max": QUEUE_MAX,
        "accepted_202": len(accepted),
        "pushed_back_429": len(pushed_back),
        "retry_after_s": retry_after,
        "server_errors_5xx": sum(r.status_code >= 500 for r in responses),
        "other": sum(r.status_code not in (202, 429) and r.status_code < 500 for r in responses),
        "accepted_completed": sum(s == "completed" for s in finished.values()),
        "accepted_lost": len(pending) + sum(s != "completed" for s in finished.values()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load_test", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "load-test.json")
    args = parser.parse_args(argv)
    prompt = "seven" if args.model == "dit-digits" else "a red seven on a black background"
    body = {"model": args.model, "variant": args.variant, "prompt": prompt, "steps": args.steps}
    runs = []
    for workers in (1, 2):
        stack = Stack(torch_threads=1, queue_max=QUEUE_MAX, rate_limit_per_minute=1_000_000)
        try:
            for w in range(workers):
                stack.start_worker(f"w{w}", args.model, args.variant)
            loops = [asyncio.run(_closed_loop(stack.url, body, c, args.seconds)) for c in (1, 4)]
            saturation = asyncio.run(_saturation(stack.url, body))
        finally:
            stack.close()
        run = {"workers": workers, "closed_loop": loops, "saturation": saturation}
        print(json.dumps(run))
        runs.append(run)
    save(
        args.out,
        "python -m bench.load_test",
        model=args.model,
        variant=args.variant,
        steps=args.steps,
        seconds=args.seconds,
        torch_threads_per_worker=1,
        runs=runs,
    )


if __name__ == "__main__":
    main()
