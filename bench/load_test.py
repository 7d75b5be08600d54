"""Load test of the running service: throughput and latency with 1 and 2 workers, what
happens at saturation, and reads under hundreds of open streams.

    python -m bench.load_test [--seconds 30] [--model dit-digits]

For 1 and then 2 workers of one variant (each with one torch thread, so two workers can use
this machine's two cores): closed-loop clients (1 and 4) calling POST /v1/images/generations
back to back for ``--seconds`` -> images/s and latency percentiles; then a burst of 1000
POST /v1/jobs from 50 clients against a queue bounded at 100 -> how many are accepted (202),
pushed back (429 with Retry-After) or fail (5xx, must be none), whether every accepted job
completes (none lost), and the server-side submit latency from the API's own histogram.
Then, with one worker whose steps are stretched (``T2I_STEP_DELAY_S``) so that one job runs
for about 30 s: 500 SSE streams open on that job while a client reads the job every 10 ms ->
latency percentiles of GET /v1/jobs/{id} (client and server side), and every stream's end.
Writes bench/results/load-test.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.record import save
from bench.scrape import samples
from bench.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
QUEUE_MAX = 100
BURST, BURST_CLIENTS = 1000, 50
STREAMS = 500
STREAM_JOB_STEPS, STREAM_STEP_DELAY_S = 30, 1.0  # the followed job runs ~30 s
TERMINAL = ("completed", "failed", "cancelled")


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


def histogram(scrape: str, name: str, labels: dict[str, str]) -> list[tuple[float, float]]:
    """The cumulative buckets ``(le, count)`` of one histogram series in a Prometheus text
    scrape, in ascending ``le``."""
    return sorted(
        (float(found["le"]), value)
        for found, value in samples(scrape, f"{name}_bucket")
        if all(found.get(k) == v for k, v in labels.items())
    )


def quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float):
    """The q-quantile of what a histogram observed between two scrapes, interpolated inside its
    bucket as Prometheus's histogram_quantile does; None if it observed nothing."""
    old = dict(before)
    counts = [(le, n - old.get(le, 0.0)) for le, n in after]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, n in counts:
        if n >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(n - below, 1e-12)
        lower, below = le, n
    return lower


async def _terminal(http: httpx.AsyncClient, ids: list[str], timeout_s: float) -> dict[str, str]:
    """Each job's status once all are finished (or when ``timeout_s`` is up)."""
    pending, finished = set(ids), {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            status = (await http.get(f"/v1/jobs/{job_id}")).json()["status"]
            if status in TERMINAL:
                finished[job_id] = status
                pending.discard(job_id)
        await asyncio.sleep(0.2)
    return {**finished, **dict.fromkeys(pending, "unfinished")}


async def _saturation(url: str, body: dict) -> dict:
    """BURST submissions from BURST_CLIENTS clients, each posting back to back."""
    route = {"route": "/v1/jobs"}
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        before = histogram(
            (await http.get("/metrics")).text, "t2i_http_request_duration_seconds", route
        )
        responses: list[httpx.Response] = []

        async def client(k: int) -> None:
            for i in range(k, BURST, BURST_CLIENTS):
                responses.append(await http.post("/v1/jobs", json={**body, "seed": i}))

        t0 = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(BURST_CLIENTS)))
        burst_s = time.monotonic() - t0
        after = histogram(
            (await http.get("/metrics")).text, "t2i_http_request_duration_seconds", route
        )
        accepted = [r.json()["id"] for r in responses if r.status_code == 202]
        pushed_back = [r for r in responses if r.status_code == 429]
        finished = await _terminal(http, accepted, 600)
    codes = Counter(r.status_code for r in responses)
    p50, p99 = quantile(before, after, 0.5), quantile(before, after, 0.99)
    return {
        "burst": BURST,
        "clients": BURST_CLIENTS,
        "queue_max": QUEUE_MAX,
        "burst_seconds": round(burst_s, 2),
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
        "accepted_202": len(accepted),
        "pushed_back_429": len(pushed_back),
        "retry_after_s": sorted({int(r.headers["retry-after"]) for r in pushed_back}),
        "server_errors_5xx": sum(r.status_code >= 500 for r in responses),
        "accepted_completed": sum(s == "completed" for s in finished.values()),
        "accepted_lost": sum(s != "completed" for s in finished.values()),
        "submit_ms_server_p50": None if p50 is None else round(1000 * p50, 2),
        "submit_ms_server_p99": None if p99 is None else round(1000 * p99, 2),
    }


async def _streams(url: str, body: dict) -> dict:
    """STREAMS SSE streams open on one long job while a client reads the job back to back."""
    route = {"route": "/v1/jobs/{job_id}"}
    limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as followers,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        long = {**body, "steps": STREAM_JOB_STEPS}
        job = (await http.post("/v1/jobs", json=long)).json()["id"]
        opened = 0

        async def follow() -> str:
            nonlocal opened
            async with followers.stream("GET", f"/v1/jobs/{job}/events") as response:
                async for line in response.aiter_lines():
                    if line.startswith("retry:"):
                        opened += 1
                    if line.startswith("data:"):
                        status = json.loads(line[5:]).get("status")
                        if status in TERMINAL:
                            return status
            return "ended without a final status"

        tasks = [asyncio.create_task(follow()) for _ in range(STREAMS)]
        t0 = time.monotonic()
        while opened < STREAMS and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.05)
        open_s = time.monotonic() - t0
        before = histogram(
            (await http.get("/metrics")).text, "t2i_http_request_duration_seconds", route
        )
        reads, running = [], True
        while running:  # every 10 ms for as long as the job runs (its steps reach 500 streams)
            t = time.perf_counter()
            view = (await http.get(f"/v1/jobs/{job}")).json()
            reads.append(1000 * (time.perf_counter() - t))
            running = view["status"] not in TERMINAL
            await asyncio.sleep(0.01)
        after = histogram(
            (await http.get("/metrics")).text, "t2i_http_request_duration_seconds", route
        )
        ends = Counter(await asyncio.gather(*tasks))
    server_p99 = quantile(before, after, 0.99)
    return {
        "streams": STREAMS,
        "streams_opened": opened,
        "seconds_to_open_all": round(open_s, 2),
        "job_steps": STREAM_JOB_STEPS,
        "step_delay_s": STREAM_STEP_DELAY_S,
        "reads_while_open": len(reads),
        "read_ms_p50": round(statistics.median(reads), 2),
        "read_ms_p99": round(_percentile(reads, 0.99), 2),
        "read_ms_server_p99": None if server_p99 is None else round(1000 * server_p99, 2),
        "stream_ends": dict(ends),
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
    stack = Stack(torch_threads=1, queue_max=QUEUE_MAX, rate_limit_per_minute=1_000_000)
    try:
        stack.start_worker("slow", args.model, args.variant, step_delay_s=STREAM_STEP_DELAY_S)
        streams = asyncio.run(_streams(stack.url, body))
    finally:
        stack.close()
    print(json.dumps(streams))
    save(
        args.out,
        "python -m bench.load_test",
        model=args.model,
        variant=args.variant,
        steps=args.steps,
        seconds=args.seconds,
        torch_threads_per_worker=1,
        runs=runs,
        streams=streams,
    )


if __name__ == "__main__":
    main()
