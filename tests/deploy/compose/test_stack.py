"""The compose stack as a user runs it (``make compose-up``): the images, users and health
checks of its containers, one worker process hosting every variant; generation through the
official openai client on every variant, an SSE stream, compares; Prometheus scraping every
target and answering every query of the Grafana dashboard; the worker killed mid-job and Redis
restarted with jobs queued. The drills come last: they take containers down for a while."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time

import httpx
import openai
from PIL import Image

from bench.dashboard import grafana_to_promql
from tests.deploy.compose.conftest import (
    API,
    PROMETHEUS,
    ROOT,
    compose,
    container,
    docker,
    inspect,
    wait_job,
    wait_until,
)
from tests.waiting import read_events

PROMPTS = {"dit-digits": "seven", "t2i-digits": "a red seven on a black background"}
WORKER = "worker-cpu"  # the one worker of the stack (no gpu profile): every variant
SERVICE_USER = "10001"  # the image's t2i user (Dockerfile; runAsUser in deploy/k8s)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_images_size_and_build_time(services, record_property):
    built = ROOT / "build" / "images.json"
    records = json.loads(built.read_text()) if built.exists() else {}
    lines = []
    for image in sorted({inspect(container(s), "{{.Config.Image}}") for s in services}):
        size = int(docker("image", "inspect", "-f", "{{.Size}}", image).strip())
        build_s = records.get(image, {}).get("build_s")
        lines.append(
            f"{image} {size / 1e9:.2f} GB" + (f", built in {build_s} s" if build_s else "")
        )
    record_property("images", "; ".join(lines))
    service_image = inspect(container("api"), "{{.Config.Image}}")
    assert int(docker("image", "inspect", "-f", "{{.Size}}", service_image)) < 4e9


def test_containers_run_as_non_root_users(services):
    for service in services:
        cid = container(service)
        # every process of the container as the host sees it, init included
        rows = docker("top", cid, "-o", "pid,uid,comm").splitlines()[1:]
        users = {row.split()[1] for row in rows}
        assert rows and "0" not in users, f"{service}: {rows}"
        if service == "api" or service.startswith("worker-"):
            assert docker("exec", cid, "id", "-u").strip() == SERVICE_USER, service


def test_every_container_is_healthy_and_restarts(services, models):
    assert {"redis", "api", "prometheus"} <= set(services)
    assert [s for s in services if s.startswith("worker-")] == [WORKER]
    for service in services:
        cid = container(service)
        assert inspect(cid, "{{.HostConfig.RestartPolicy.Name}}") == "unless-stopped", service
        wait_until(
            lambda cid=cid: inspect(cid, "{{.State.Health.Status}}") == "healthy",
            120,
            1,
            what=f"{service} healthy",
        )
    published = docker("port", container("api")).split()
    assert published == ["8000/tcp", "->", "127.0.0.1:8000"], published
    # the one worker's heartbeats go to every variant it hosts
    body = httpx.get(f"{API}/v1/models", timeout=10).json()
    live = {f"{m['id']}/{v['id']}": v["workers"] for m in body["data"] for v in m["variants"]}
    assert len(live) == sum(len(v) for v in models.values()) and set(live.values()) == {1}, live


def test_openai_client_generates_on_every_variant(models):
    client = openai.OpenAI(base_url=f"{API}/v1", api_key="unused", max_retries=0, timeout=120)
    for model, variants in models.items():
        for variant in variants:
            result = client.images.generate(
                model=model,
                prompt=PROMPTS.get(model, "seven"),
                n=2,
                size="32x32",
                extra_body={"variant": variant, "seed": 3},
            )
            assert [_png(d.b64_json).size for d in result.data] == [(32, 32)] * 2
            extra = result.model_extra
            assert extra["variant"] == variant and extra["timings"]["inference_s"] > 0


def test_a_lora_adapter_runs_in_the_container(models):
    """The image carries the adapters the registry pins, readable by the worker's user."""
    client = openai.OpenAI(base_url=f"{API}/v1", api_key="unused", max_retries=0, timeout=120)
    for model in models:
        result = client.images.generate(
            model=model,
            prompt=PROMPTS.get(model, "seven"),
            extra_body={"seed": 3, "lora": [{"name": "italic", "scale": 0.5}]},
        )
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        parameters = json.loads(image.info["parameters"])
        assert [(a["name"], a["scale"]) for a in parameters["lora"]] == [("italic", 0.5)]


def test_sse_stream_runs_to_the_end(http):
    body = {"model": "t2i-digits", "prompt": PROMPTS["t2i-digits"], "steps": 12, "seed": 4}
    job = http.post("/v1/jobs", json={**body, "variant": "w4a8-sqnr"}).json()
    with http.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        events = read_events(response)
    assert [e["data"]["step"] for e in events if e["event"] == "progress"] == list(range(1, 13))
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "completed"
    view = http.get(f"/v1/jobs/{job['id']}").json()
    assert http.get(view["images"][0]).headers["content-type"] == "image/png"


def test_compare_every_variant_against_full_precision(http, models):
    for model, variants in models.items():
        body = {"model": model, "prompt": PROMPTS.get(model, "seven"), "seed": 2}
        reply = http.post("/v1/compare", json=body, timeout=180)
        assert reply.status_code == 200, reply.text
        rows = {r["variant"]: r for r in reply.json()["variants"]}
        assert set(rows) == set(variants)
        assert all(r["status"] == "completed" and r["b64_png"] for r in rows.values())
        for row in rows.values():
            if row["quantized"]:
                assert 5 < row["psnr_db"] < 80 and row["sqnr_latent_db"] is not None, row


def test_a_running_job_is_cancelled(http, models):
    # the slowest eager variant of each model, long enough to be caught running
    for model in models:
        body = {"model": model, "prompt": PROMPTS.get(model, "seven"), "variant": "w4a8-sqnr"}
        job = http.post("/v1/jobs", json={**body, "steps": 100, "n": 4}).json()
        wait_job(http, job["id"], lambda v: v["step"] >= 1, 60, "the job to run")
        http.post(f"/v1/jobs/{job['id']}/cancel")
        done = wait_job(http, job["id"], lambda v: v["status"] == "cancelled", 30, "cancel")
        assert done["progress"] < 100


def test_prometheus_scrapes_every_target_and_the_dashboard_has_data(
    services, models, record_property
):
    with httpx.Client(base_url=PROMETHEUS, timeout=30) as prom:
        targets = prom.get("/api/v1/targets").json()["data"]["activeTargets"]
        hosts = {t["labels"]["instance"]: t["health"] for t in targets}
        workers = {f"{s}:9101" for s in services if s.startswith("worker-")}
        assert set(hosts) == {"api:8000"} | workers
        assert set(hosts.values()) == {"up"}, hosts
        # one target warmed every variant up
        query = "count by (instance) (t2i_model_warmup_seconds)"
        warm = prom.get("/api/v1/query", params={"query": query}).json()["data"]["result"]
        variants = sum(len(v) for v in models.values())
        assert {r["metric"]["instance"]: int(r["value"][1]) for r in warm} == {
            f"{WORKER}:9101": variants
        }
        dashboard = json.loads(
            (ROOT / "deploy/grafana/dashboards/quantized-vs-fp.json").read_text()
        )
        queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]

        def empty() -> list[str]:
            missing = []
            for model in models:
                for title, expr in queries:
                    query = grafana_to_promql(expr, model, "10m")
                    body = prom.get("/api/v1/query", params={"query": query}).json()
                    assert body["status"] == "success", (title, body)
                    if not body["data"]["result"]:
                        missing.append(f"{model}: {title}: {expr}")
            return missing

        # the failed-job ratio has data once a job has failed; none does here
        def only_failed_ratio_empty():
            missing = empty()
            return all('status="failed"' in m for m in missing) and missing

        missing = wait_until(only_failed_ratio_empty, 90, 5, what="the dashboard's data")
        assert len(missing) == len(models), missing
        for variable in dashboard["templating"]["list"]:
            query = variable["query"]["query"]
            label = query[query.rindex(",") + 1 : -1].strip()
            values = prom.get(f"/api/v1/label/{label}/values").json()["data"]
            assert set(models if label == "model" else models["dit-digits"]) <= set(values)
    record_property(
        "prometheus",
        f"{len(hosts)} targets up; {len(queries) * len(models)} dashboard queries answer, "
        f"all with data but the failed-job ratio ({len(missing)}: no job failed)",
    )


def test_a_worker_killed_mid_job_restarts_and_its_job_completes(http, record_property):
    """The container's process dies by SIGKILL, as an out-of-memory kill or a crash does; the
    restart policy brings the worker back, it loads its variants again and takes the job over
    (T2I_RECLAIM_IDLE_S). Not ``docker kill``: the engine counts that as a stop by hand, after
    which no restart policy restarts the container."""
    service = WORKER
    cid = container(service)
    restarts = int(inspect(cid, "{{.RestartCount}}"))
    body = {"model": "t2i-digits", "variant": "w4a8-sqnr", "prompt": PROMPTS["t2i-digits"]}
    job = http.post("/v1/jobs", json={**body, "steps": 100, "n": 4, "seed": 5}).json()
    running = wait_job(http, job["id"], lambda v: v["step"] >= 1, 60, "the job to run")
    os.kill(int(inspect(cid, "{{.State.Pid}}")), signal.SIGKILL)
    t0 = time.monotonic()
    done = wait_job(http, job["id"], lambda v: v["status"] == "completed", 300, "the job")
    seconds = time.monotonic() - t0
    assert int(inspect(cid, "{{.RestartCount}}")) == restarts + 1
    assert done["deliveries"] == 2 and done["result"]["worker"] != running["worker"]
    assert len(done["images"]) == 4
    wait_until(lambda: inspect(cid, "{{.State.Health.Status}}") == "healthy", 300, 1, what=service)
    record_property(
        "kill drill",
        f"{service} SIGKILLed at step {running['step']}/100: restarted (restart count "
        f"{restarts} -> {restarts + 1}), the job completed on the new worker {seconds:.1f} s "
        "after the kill (2 deliveries, 4 images)",
    )


def test_redis_restart_keeps_twenty_queued_jobs(http, record_property):
    body = {"model": "t2i-digits", "variant": "w8a8", "prompt": PROMPTS["t2i-digits"]}
    ids = [
        http.post("/v1/jobs", json={**body, "steps": 60, "seed": i}).json()["id"] for i in range(20)
    ]
    views = [http.get(f"/v1/jobs/{i}").json() for i in ids]
    queued = sum(v["status"] == "queued" for v in views)
    assert queued >= 10, [v["status"] for v in views]
    t0 = time.monotonic()
    compose("restart", "redis")
    restarted_s = time.monotonic() - t0
    for job_id in ids:
        done = wait_job(http, job_id, lambda v: v["status"] in ("completed", "failed"), 300, job_id)
        assert done["status"] == "completed" and len(done["images"]) == 1, done
    seconds = time.monotonic() - t0
    record_property(
        "redis restart drill",
        f"20 jobs submitted, {queued} still queued when Redis restarted ({restarted_s:.1f} s); "
        f"20 of 20 completed {seconds:.1f} s after the restart began",
    )
