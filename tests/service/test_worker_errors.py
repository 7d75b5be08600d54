"""A pipeline error (here an injected CUDA out-of-memory) fails that job, with a clear
message, and the worker goes on with the next one. Real Redis and queue; the worker runs
in this process so that the fault can be injected into its pipeline."""

from __future__ import annotations

import torch

from app.registry import WorkerSpec, load_registry
from app.worker.main import Worker
from tests.service.conftest import Server, make_settings


def test_pipeline_error_fails_the_job_and_the_worker_lives_on(redis_url, registry_file):
    settings = make_settings(redis_url, registry_file)
    key = ("dit-digits", "fp32")
    worker = Worker(settings, load_registry(registry_file), WorkerSpec("w", "cpu", (key,)), "w")
    consumer = worker.consumers[key]
    consumer.ensure_group()
    loaded = worker.residency.get(worker._slot(key))
    forward = loaded.pipe.transformer.forward
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    loaded.pipe.transformer.forward = failing_once
    with Server(settings) as server, server.client() as http:
        body = {"model": "dit-digits", "prompt": "8", "steps": 3}
        first = http.post("/v1/jobs", json=body).json()["id"]
        second = http.post("/v1/jobs", json=body).json()["id"]
        for _ in range(2):
            [claimed] = consumer.take(1, 1000)
            worker.run(key, [claimed])
        failed = http.get(f"/v1/jobs/{first}").json()
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "generation_failed"
        assert failed["error"]["message"].startswith("out of memory")
        assert http.get(f"/v1/jobs/{second}").json()["status"] == "completed"
