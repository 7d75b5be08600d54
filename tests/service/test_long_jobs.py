"""The service in the regime of real checkpoints: jobs that take tens of seconds, hundreds of
open streams, a Redis that stalls. Workers are real processes whose every denoising step is
stretched by ``T2I_STEP_DELAY_S`` (a test-only setting), so a 32x32 model takes as long as a
large one without its memory or compute."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from app.supervisor import start_redis
from tests.service.conftest import (
    WorkerProcess,
    free_port,
    make_settings,
    serving,
    wait_until,
)

SLOW_STEP_S = 20.0  # one step of the "slow" workers: a one-step job takes 20 s
TERMINAL = ('"status": "completed"', '"status": "failed"', '"status": "cancelled"')
ONE_STEP = {"model": "dit-digits", "prompt": "seven", "steps": 1, "seed": 1}


@pytest.fixture(scope="module")
def slow(redis_url, registry_file):
    settings = make_settings(
        redis_url,
        registry_file,
        step_delay_s=SLOW_STEP_S,
        generation_timeout_s=120.0,
        reclaim_idle_s=60.0,
    )
    workers = [WorkerProcess(settings, "dit-digits", "fp32", name=f"slow-{i}") for i in range(2)]
    with serving(settings, workers) as server:
        yield server


def test_a_20_s_synchronous_generation_answers_200(slow):
    with slow.client() as http:
        t0 = time.monotonic()
        response = http.post("/v1/images/generations", json=ONE_STEP)
        elapsed = time.monotonic() - t0
    assert response.status_code == 200, response.text
    assert elapsed >= SLOW_STEP_S
    assert len(response.json()["data"]) == 1 and response.json()["data"][0]["b64_json"]


def test_one_sse_connection_lasts_across_a_20_s_gap(slow):
    with slow.client() as http:
        job = http.post("/v1/jobs", json=ONE_STEP).json()
        seen: list[tuple[float, str]] = []
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
            assert events.status_code == 200
            for line in events.iter_lines():
                seen.append((time.monotonic(), line))
                if line.startswith("data:") and any(t in line for t in TERMINAL):
                    break
    data = [(t, line) for t, line in seen if line.startswith("data:")]
    assert '"status": "completed"' in data[-1][1], seen
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(data)]
    assert max(gaps) >= SLOW_STEP_S - 1  # no event for the whole step ...
    assert any(line == ": keep-alive" for _, line in seen)  # ... only the keep-alive comment


def test_a_streamed_40_s_generation_reaches_the_official_client_through_keep_alives(slow):
    """The openai client streams a two-step job (each step stretched to 20 s) with a 30 s read
    timeout: the preview comes as soon as the first step is computed, the image ~40 s later,
    and keep-alive comments (every 15 s) hold the connection through the silence."""
    client = openai.OpenAI(base_url=f"{slow.url}/v1", api_key="unused", max_retries=0, timeout=30.0)
    t0 = time.monotonic()
    arrived = []
    for event in client.images.generate(
        model="dit-digits",
        prompt="a seven",
        stream=True,
        partial_images=1,
        extra_body={"steps": 2, "seed": 1},
    ):
        arrived.append((event.type, time.monotonic() - t0))
    assert [kind for kind, _ in arrived] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert arrived[0][1] < SLOW_STEP_S and arrived[1][1] - arrived[0][1] > 30.0


def test_500_open_streams_leave_the_other_routes_answering(slow):
    """Each SSE stream waits through the API's one shared listener, not a pooled connection
    of its own, so 500 of them leave the pool to the other routes."""
    streams = 500

    async def scenario():
        limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(base_url=slow.url, timeout=150, limits=limits) as followers,
            httpx.AsyncClient(base_url=slow.url, timeout=30) as http,
        ):
            job = (await http.post("/v1/jobs", json=ONE_STEP)).json()
            opened = 0

            async def follow() -> str:
                nonlocal opened
                async with followers.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("retry:"):
                            opened += 1
                        if line.startswith("data:") and any(t in line for t in TERMINAL):
                            return json.loads(line[5:])["status"]
                return "ended without a final status"

            tasks = [asyncio.create_task(follow()) for _ in range(streams)]
            deadline = time.monotonic() + 60
            while opened < streams and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert opened == streams, f"only {opened} streams opened"
            answers = []
            for _ in range(10):  # while all of them are open and the job runs
                answers.append((await http.get("/v1/models")).status_code)
                answers.append((await http.get(f"/v1/jobs/{job['id']}")).status_code)
                spare = {**ONE_STEP, "variant": "spare"}  # queued for good: no worker
                answers.append((await http.post("/v1/jobs", json=spare)).status_code)
            assert not all(t.done() for t in tasks), "the job ended before the checks"
            finals = await asyncio.gather(*tasks)
            return answers, finals

    answers, finals = asyncio.run(scenario())
    assert set(answers) <= {200, 202}, answers
    assert finals == ["completed"] * streams


def test_redis_frozen_10_s_mid_job_loses_nothing(tmp_path, registry_file):
    """SIGSTOP Redis for 10 s while two jobs run: the worker writes its progress late and its
    results once Redis is back; neither job fails or runs twice; the SSE stream and the
    synchronous request both end with the result."""
    own = start_redis(free_port(), tmp_path)  # its own: SIGSTOP must not stall other tests
    process, url = own.process, own.url
    settings = make_settings(
        url, registry_file, step_delay_s=0.5, reclaim_idle_s=60.0, generation_timeout_s=120.0
    )
    workers = [WorkerProcess(settings, "dit-digits", "fp32", name=f"frozen-{i}") for i in (1, 2)]
    body = {"model": "dit-digits", "prompt": "three", "steps": 24, "seed": 3}
    try:
        with serving(settings, workers) as server, server.client() as http:
            job = http.post("/v1/jobs", json=body).json()
            outcome: dict = {}

            def generate():
                with server.client() as other:
                    outcome["sync"] = other.post("/v1/images/generations", json=body)

            def follow():
                with (
                    server.client() as other,
                    other.stream("GET", f"/v1/jobs/{job['id']}/events") as events,
                ):
                    outcome["sse"] = [line for line in events.iter_lines() if line]

            threads = [threading.Thread(target=generate), threading.Thread(target=follow)]
            for t in threads:
                t.start()
            wait_until(
                lambda: http.get(f"/v1/jobs/{job['id']}").json()["step"] >= 2, 60, 0.2, what="run"
            )
            os.kill(process.pid, signal.SIGSTOP)
            time.sleep(10)
            os.kill(process.pid, signal.SIGCONT)
            for t in threads:
                t.join(150)
            done = http.get(f"/v1/jobs/{job['id']}").json()
            assert done["status"] == "completed" and done["deliveries"] == 1, done
            assert outcome["sync"].status_code == 200, outcome["sync"].text
            synced = http.get(f"/v1/jobs/{outcome['sync'].json()['id']}").json()
            assert synced["status"] == "completed" and synced["deliveries"] == 1
            events = [line for line in outcome["sse"] if line.startswith("data:")]
            assert '"status": "completed"' in events[-1]
            steps = {json.loads(e[5:]).get("step") for e in events} - {None}
            assert steps == set(range(1, 25))  # every step's event, written late or not
    finally:
        os.kill(process.pid, signal.SIGCONT)
        own.stop()
