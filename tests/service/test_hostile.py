"""The API against callers who are not polite: other keys, crafted ids and headers, big or
broken bodies, made-up methods, a forged Host; and the queue's books when records expire.
A real redis-server and a real uvicorn server; no worker (jobs go to variants nobody serves)."""

from __future__ import annotations

import re
import time

import httpx
import pytest
import redis

from app.queue.consumer import Consumer
from app.queue.keys import Keys
from bench.scrape import samples
from tests.service.conftest import Server, free_port, make_settings, wait_until

JOB = {"model": "dit-digits", "prompt": "seven", "variant": "spare", "steps": 2}
ALICE, BOB = ({"Authorization": f"Bearer {k}"} for k in ("alice-key", "bob-key"))


def _error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.fixture
def keyed(redis_url, registry_file):
    settings = make_settings(
        redis_url, registry_file, api_keys=["alice-key", "bob-key"], auth_failures_per_minute=50
    )
    with Server(settings) as server:
        yield server


def test_other_keys_get_404_on_every_job_and_comparison_route(keyed):
    with keyed.client() as http:
        job = http.post("/v1/jobs", json=JOB, headers=ALICE).json()["id"]
        comparison = http.post(
            "/v1/comparisons",
            json={"model": "dit-digits", "prompt": "seven", "variants": ["spare"]},
            headers=ALICE,
        ).json()
        routes = [
            ("GET", f"/v1/jobs/{job}"),
            ("GET", f"/v1/jobs/{job}/events"),
            ("GET", f"/v1/jobs/{job}/images/0"),
            ("POST", f"/v1/jobs/{job}/cancel"),
            ("GET", f"/v1/jobs/{comparison['variants'][0]['job_id']}"),
            ("GET", f"/v1/comparisons/{comparison['id']}"),
        ]
        for method, path in routes:
            assert _error(http.request(method, path, headers=BOB), 404)["param"] == "id", path
        # the owner still has all of it (the job is queued: it has no image 0 yet)
        assert http.get(f"/v1/jobs/{job}", headers=ALICE).json()["status"] == "queued"
        assert http.get(f"/v1/comparisons/{comparison['id']}", headers=ALICE).status_code == 200
        assert _error(http.get(f"/v1/jobs/{job}/images/0", headers=ALICE), 404, "index")
        assert http.post(f"/v1/jobs/{job}/cancel", headers=ALICE).json()["status"] == "cancelled"
        # idempotency keys are per owner too
        same = {"Idempotency-Key": "order-1"}
        a = http.post("/v1/jobs", json=JOB, headers={**ALICE, **same}).json()["id"]
        b = http.post("/v1/jobs", json=JOB, headers={**BOB, **same}).json()["id"]
        assert a != b
    record = redis.Redis.from_url(keyed.settings.redis_url).hgetall(
        Keys(keyed.settings.key_prefix).job(job)
    )
    assert re.fullmatch(rb"[0-9a-f]{16}", record[b"owner"])  # a hash of the key ...
    assert b"alice-key" not in b"".join(record.values())  # ... never the key


def test_authentication_comes_before_the_body_and_failures_are_throttled(redis_url, registry_file):
    settings = make_settings(
        redis_url, registry_file, api_keys=["alice-key"], auth_failures_per_minute=3
    )
    with Server(settings) as server, server.client() as http:
        assert _error(http.post("/v1/jobs", content=b"{not json"), 401)  # not 400
        assert _error(http.post("/v1/jobs", content=b"{not json", headers=ALICE), 400)
        for _ in range(2):  # three failures in all
            _error(http.get("/v1/models", headers=BOB), 401)
        throttled = http.get("/v1/models", headers=BOB)
        assert _error(throttled, 429)["code"] == "auth_throttled"
        assert 1 <= int(throttled.headers["retry-after"]) <= 60
        # while throttled, even a right key from this address waits (no guessing at full speed)
        assert http.get("/v1/models", headers=ALICE).status_code == 429
        assert http.get("/healthz").status_code == 200  # probes are not behind keys


def test_bodies_over_the_limit_are_413_before_parsing(redis_url, registry_file):
    settings = make_settings(redis_url, registry_file, max_body_bytes=4096, max_upload_bytes=8192)
    big = b'{"model": "dit-digits", "prompt": "' + b"x" * 9000 + b'"}'
    middling = b'{"model": "dit-digits", "prompt": "' + b"x" * 6000 + b'"}'
    json_body = {"Content-Type": "application/json"}
    with Server(settings) as server, server.client() as http:
        declared = http.post("/v1/jobs", content=big, headers=json_body)
        assert _error(declared, 413)["code"] == "body_too_large"
        # routes that may carry images have the larger limit: this one is read, then refused
        assert _error(http.post("/v1/images/generations", content=middling, headers=json_body), 413)
        for route in ("/v1/jobs", "/v1/compare", "/v1/comparisons"):
            assert _error(http.post(route, content=middling, headers=json_body), 400, "prompt")

        def chunks():  # no Content-Length: counted while reading
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        assert _error(http.post("/v1/jobs", content=chunks()), 413)
        assert http.post("/v1/jobs", json=JOB).status_code == 202  # a normal body still goes


def test_crafted_ids_and_event_ids_are_4xx_and_the_connection_stays_usable(
    redis_url, registry_file
):
    with Server(make_settings(redis_url, registry_file)) as server, server.client() as http:
        job = http.post("/v1/jobs", json=JOB).json()["id"]
        for path in (
            f"/v1/jobs/{job}:events",  # the key of its event stream, of another Redis type
            f"/v1/jobs/{job}:events/events",
            f"/v1/jobs/{job}:done/cancel",
            f"/v1/jobs/{job.upper()}",
            "/v1/jobs/" + "f" * 64,
            f"/v1/comparisons/{job}:x",
        ):
            method = "POST" if path.endswith("/cancel") else "GET"
            assert _error(http.request(method, path), 404, "id"), path
        for bad in (b"99999999999999999999-0", b"\xb9-0", b"1-2-3", b"-1", b"1-"):
            events = http.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": bad})
            assert _error(events, 400, "Last-Event-ID"), bad
        assert http.get("/healthz").status_code == 200  # the same client, still served


def test_urls_come_from_configuration_never_from_host(redis_url, registry_file):
    evil = {"Host": "evil.example"}
    with Server(make_settings(redis_url, registry_file)) as server, server.client() as http:
        created = http.post("/v1/jobs", json=JOB, headers=evil)
        assert created.headers["location"] == f"/v1/jobs/{created.json()['id']}"
    settings = make_settings(redis_url, registry_file, public_url="https://images.example.com/")
    with Server(settings) as server, server.client() as http:
        created = http.post("/v1/jobs", json=JOB, headers=evil)
        expected = f"https://images.example.com/v1/jobs/{created.json()['id']}"
        assert created.headers["location"] == expected


def test_metrics_labels_are_bounded_and_true(redis_url, registry_file):
    with Server(make_settings(redis_url, registry_file)) as server, server.client() as http:
        for i in range(30):
            http.request(f"MADEUP{i}", "/v1/models")
        job = http.post("/v1/jobs", json=JOB).json()["id"]
        before = _cancelled(http)
        for _ in range(3):
            assert http.post(f"/v1/jobs/{job}/cancel").json()["status"] == "cancelled"
        assert _cancelled(http) == before + 1  # cancelling again is a no-op
        requests = samples(http.get("/metrics").text, "t2i_http_requests_total")
        methods = {labels["method"] for labels, _ in requests}
        assert "other" in methods and methods <= {"GET", "POST", "HEAD", "OPTIONS", "other"}
    dead = make_settings(f"redis://127.0.0.1:{free_port()}/0", registry_file, redis_timeout_s=1)
    with Server(dead) as server, server.client() as http:
        answer = http.get("/v1/models")
        assert _error(answer, 503)["code"] == "redis_unavailable"
        assert http.get("/healthz").status_code == 200  # the connection is still usable
        requests = samples(http.get("/metrics").text, "t2i_http_requests_total")
    counted = {"route": "/v1/models", "method": "GET", "status": "503"}
    assert any(labels == counted for labels, _ in requests), "a 503 is counted as a 503"


def _cancelled(http) -> float:
    wanted = {"model": "dit-digits", "variant": "spare", "status": "cancelled"}
    jobs = samples(http.get("/metrics").text, "t2i_jobs_total")
    return sum(value for labels, value in jobs if labels == wanted)


def test_refused_submissions_do_not_use_up_the_rate_budget(redis_url, registry_file):
    settings = make_settings(
        redis_url, registry_file, api_keys=["alice-key"], rate_limit_per_minute=2
    )
    with Server(settings) as server, server.client(headers=ALICE) as http:
        for _ in range(5):
            _error(http.post("/v1/jobs", json={**JOB, "size": "64x64"}), 400, "size")
        assert http.post("/v1/jobs", json=JOB).status_code == 202
        assert http.post("/v1/jobs", json=JOB).status_code == 202
        assert _error(http.post("/v1/jobs", json=JOB), 429)["code"] == "rate_limit_exceeded"


def test_a_compare_that_cannot_queue_every_variant_queues_none(redis_url, registry_file):
    settings = make_settings(redis_url, registry_file, queue_max=1)
    with Server(settings) as server, server.client() as http:
        assert http.post("/v1/jobs", json=JOB).status_code == 202  # "spare" is now full
        body = {"model": "dit-digits", "prompt": "seven", "variants": ["fp32", "spare"]}
        for route in ("/v1/comparisons", "/v1/compare"):
            refused = http.post(route, json=body)
            assert _error(refused, 429)["code"] == "queue_full" and "spare" in refused.text
        depths = _depths(http)
        assert depths["fp32"] == 0 and depths["spare"] == 1
        keys = Keys(settings.key_prefix)
        assert redis.Redis.from_url(redis_url).xlen(keys.stream("dit-digits", "fp32")) == 0


def _depths(http) -> dict[str, int]:
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    return {v["id"]: v["queue_depth"] for v in models["dit-digits"]["variants"]}


def test_records_gone_while_queued_leave_the_queue(redis_url, registry_file):
    """Expired (TTL) or evicted job records no longer count: the depth comes down and the
    variant takes submissions again; a worker starting up drops what is left of them."""
    settings = make_settings(redis_url, registry_file, queue_max=2, job_ttl_s=2)
    client = redis.Redis.from_url(redis_url)
    keys = Keys(settings.key_prefix)
    with Server(settings) as server, server.client() as http:
        for _ in range(2):
            assert http.post("/v1/jobs", json=JOB).status_code == 202
        assert _error(http.post("/v1/jobs", json=JOB), 429)["code"] == "queue_full"
        time.sleep(2.5)  # both records expire
        wait_until(lambda: _depths(http)["spare"] == 0, 5, 0.2, what="depth 0")
        evicted = [http.post("/v1/jobs", json=JOB).json()["id"] for _ in range(2)]
        client.delete(*(keys.job(j) for j in evicted))  # as maxmemory eviction would
        assert http.post("/v1/jobs", json=JOB).status_code == 202  # 429 only if really full
        # ghosts a worker finds at start: ids queued with no record
        queued = keys.queued("dit-digits", "fp32")
        client.zadd(queued, {"a" * 32: time.time(), "b" * 32: time.time()})
        consumer = Consumer(
            client,
            keys,
            model="dit-digits",
            variant="fp32",
            name="starting",
            job_ttl_s=settings.job_ttl_s,
            reclaim_idle_s=settings.reclaim_idle_s,
            max_deliveries=settings.max_deliveries,
        )
        assert consumer.reconcile() == 2 and client.zcard(queued) == 0


def test_sse_of_a_finished_job_replays_and_ends(redis_url, registry_file):
    with Server(make_settings(redis_url, registry_file)) as server, server.client() as http:
        job = http.post("/v1/jobs", json=JOB).json()["id"]
        http.post(f"/v1/jobs/{job}/cancel")
        events = http.get(f"/v1/jobs/{job}/events", timeout=httpx.Timeout(10))
        ids = re.findall(r"^id: (\S+)$", events.text, re.M)
        assert len(ids) == 2 and '"status": "cancelled"' in events.text
        after = http.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": ids[0]})
        assert re.findall(r"^id: (\S+)$", after.text, re.M) == ids[1:]
