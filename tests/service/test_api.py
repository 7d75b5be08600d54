"""The API against a real redis-server, with no worker running: contract, validation, auth,
backpressure, idempotency, cancel of a queued job, readiness, the dead-letter path."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import pytest
import redis
from PIL import Image

from app.queue.consumer import Consumer
from app.queue.keys import Keys
from tests.service.conftest import Server, make_settings, wait_until


@pytest.fixture
def server(redis_url, registry_file):
    with Server(make_settings(redis_url, registry_file, queue_max=3)) as s:
        yield s


def _error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


JOB = {"model": "dit-digits", "prompt": "seven", "variant": "spare", "steps": 2}


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": "nope"}, 404, "model"),
        ({"variant": "w2a2"}, 404, "variant"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "   "}, 400, "prompt"),
        ({"prompt": "x" * 1001}, 400, "prompt"),
        ({"prompt": "a purple elephant"}, 400, "prompt"),  # names no class of a DiT model
        ({"n": 0}, 400, "n"),
        ({"n": 5}, 400, "n"),
        ({"size": "64x64"}, 400, "size"),
        ({"size": "banana"}, 400, "size"),
        ({"steps": 0}, 400, "steps"),
        ({"steps": 2001}, 400, "steps"),
        ({"guidance_scale": 100.0}, 400, "guidance_scale"),
        ({"guidance_scale": -1.0}, 400, "guidance_scale"),
        ({"seed": -1}, 400, "seed"),
        ({"seed": 2**64}, 400, "seed"),
        ({"response_format": "gif"}, 400, "response_format"),
        ({"output_format": "bmp"}, 400, "output_format"),
        ({"negative_prompt": "blue"}, 400, "negative_prompt"),
        ({"n": "many"}, 400, "n"),
        ({"scheduler": "euler"}, 400, "scheduler"),  # DiTPipeline cannot run Euler correctly
        ({"scheduler": "heun"}, 400, "scheduler"),
        ({"partial_images": 4}, 400, "partial_images"),
        # jobs are followed at /v1/jobs/{id}/events; a stream makes one image
        ({"stream": True, "n": 2}, 400, {"jobs": "stream", "generations": "n"}),
        ({"strength": 0.5}, 400, "strength"),  # only an edit has a strength
    ],
)
def test_bad_inputs_are_4xx_naming_the_parameter(server, change, status, param):
    with server.client() as http:
        for route in ("/v1/jobs", "/v1/images/generations"):
            said = param[route.rsplit("/", 1)[1]] if isinstance(param, dict) else param
            _error(http.post(route, json={**JOB, **change}), status, said)


def _image_bytes(size=(32, 32), mode="RGB", fmt="PNG", alpha_box=None) -> bytes:
    image = Image.new(mode, size, (200, 10, 10, 255) if mode == "RGBA" else (200, 10, 10))
    if alpha_box is not None:
        image.paste((0, 0, 0, 0), alpha_box)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height and holds almost nothing (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


EDIT = {"model": "t2i-digits", "prompt": "a red seven", "variant": "fp32", "steps": 2}
MASK = _image_bytes(mode="RGBA", alpha_box=(0, 0, 16, 32))


@pytest.mark.parametrize(
    ("files", "fields", "param"),
    [
        ({"image": ("x.png", b"not an image", "image/png")}, {}, "image"),
        ({"image": ("x.gif", _image_bytes(fmt="GIF"), "image/gif")}, {}, "image"),
        ({"image": ("x.png", b"", "image/png")}, {}, "image"),
        ({"image": ("x.png", _png_header(32, 32), "image/png")}, {}, "image"),  # truncated
        ({"image": ("x.png", _png_header(5000, 5000), "image/png")}, {}, "image"),
        ({"image": ("x.png", _png_header(10000, 10000), "image/png")}, {}, "image"),
        ({"image": ("x.png", _png_header(20000, 20000), "image/png")}, {}, "image"),
        ({"mask": ("m.png", MASK, "image/png")}, {}, "image"),  # no image at all
        (  # two images
            [("image[]", ("a.png", _image_bytes())), ("image[]", ("b.png", _image_bytes()))],
            {},
            "image",
        ),
        (  # a mask of another size
            {"image": ("x.png", _image_bytes()), "mask": ("m.png", _image_bytes((16, 16), "RGBA"))},
            {},
            "mask",
        ),
        (  # a mask without alpha: nothing says what to edit
            {"image": ("x.png", _image_bytes()), "mask": ("m.png", _image_bytes())},
            {},
            "mask",
        ),
        (  # a mask with no transparent pixel
            {"image": ("x.png", _image_bytes()), "mask": ("m.png", _image_bytes(mode="RGBA"))},
            {},
            "mask",
        ),
        ({"image": ("x.png", _image_bytes())}, {"strength": "0"}, "strength"),
        ({"image": ("x.png", _image_bytes())}, {"strength": "1.5"}, "strength"),
        ({"image": ("x.png", _image_bytes())}, {"strength": "0.2"}, "strength"),  # 0 of 2 steps
        ({"image": ("x.png", _image_bytes())}, {"input_fidelity": "high"}, "input_fidelity"),
        ({"image": ("x.png", _image_bytes())}, {"style": "vivid"}, "style"),  # not an edit's
        ({"image": ("x.png", _image_bytes())}, {"size": "64x64"}, "size"),
        ({"image": ("x.png", _image_bytes())}, {"model": "nope"}, "model"),
        (  # DiT edits without a mask only
            {"image": ("x.png", _image_bytes()), "mask": ("m.png", MASK)},
            {"model": "dit-digits", "prompt": "seven"},
            "mask",
        ),
    ],
)
def test_bad_edits_are_400_naming_the_parameter(server, files, fields, param):
    with server.client() as http:
        response = http.post("/v1/images/edits", files=files, data={**EDIT, **fields})
        _error(response, 404 if param == "model" else 400, param)


def test_edit_bodies_over_the_upload_limit_are_413_and_json_is_refused(server):
    with server.client() as http:
        _error(http.post("/v1/images/edits", json=EDIT), 400, "image")
        big = b"\x89PNG" + b"0" * (16 << 20)
        response = http.post("/v1/images/edits", files={"image": ("x.png", big)}, data=EDIT)
        _error(response, 413, "body")
        job = {**EDIT, "image": base64.b64encode(_image_bytes()).decode(), "strength": 0.0}
        _error(http.post("/v1/jobs", json=job), 400, "strength")
        _error(http.post("/v1/jobs", json={**job, "strength": 1, "image": "@@"}), 400, "image")
        _error(http.post("/v1/jobs", json={**EDIT, "stream": True}), 400, "stream")


def test_malformed_bodies_never_500(server):
    with server.client() as http:
        assert http.post("/v1/jobs", content=b"{not json").status_code == 400
        assert http.post("/v1/jobs", json=[1, 2]).status_code == 400
        assert http.post("/v1/jobs", json={}).status_code == 400
        _error(http.get("/v1/jobs/" + "f" * 32), 404, "id")
        _error(http.get("/v1/jobs/" + "f" * 500), 404, "id")
        _error(http.get("/v1/jobs/abc/events", headers={"Last-Event-ID": "x"}), 404)
        _error(http.get("/nowhere"), 404)


def test_job_lifecycle_while_queued(server):
    with server.client() as http:
        first = http.post("/v1/jobs", json=JOB)
        assert first.status_code == 202, first.text
        created = first.json()
        assert created["status"] == "queued" and created["position"] == 0
        assert first.headers["location"].endswith(f"/v1/jobs/{created['id']}")
        second = http.post("/v1/jobs", json={**JOB, "prompt": "3"}).json()
        assert second["position"] == 1
        view = http.get(f"/v1/jobs/{second['id']}").json()
        assert view["status"] == "queued" and view["position"] == 1 and view["progress"] == 0
        assert view["steps"] == 2 and view["timings"]["queue_wait_s"] is None
        assert isinstance(view["seed"], int)  # drawn at submission, so a re-run is the same

        cancelled = http.post(f"/v1/jobs/{created['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert http.get(f"/v1/jobs/{second['id']}").json()["position"] == 0
        # cancelling twice answers the same; the event stream ends with the cancellation
        assert http.post(f"/v1/jobs/{created['id']}/cancel").json()["status"] == "cancelled"
        events = http.get(f"/v1/jobs/{created['id']}/events").text
        assert events.count("event: status") == 2 and '"status": "cancelled"' in events
        _error(http.get(f"/v1/jobs/{created['id']}/images/0"), 404, "index")


def test_queue_full_is_429_with_retry_after(server):
    with server.client() as http:
        for _ in range(3):
            assert http.post("/v1/jobs", json=JOB).status_code == 202
        full = http.post("/v1/jobs", json=JOB)
        error = _error(full, 429)
        assert error["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        # another variant's queue is not affected
        assert http.post("/v1/jobs", json={**JOB, "variant": "fp32"}).status_code == 202


def test_idempotency_key_returns_the_same_job(server):
    with server.client() as http:
        headers = {"Idempotency-Key": "order-42"}
        a = http.post("/v1/jobs", json=JOB, headers=headers).json()
        b = http.post("/v1/jobs", json={**JOB, "prompt": "one"}, headers=headers).json()
        c = http.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-43"}).json()
        assert a["id"] == b["id"] != c["id"]


def test_api_keys(redis_url, registry_file):
    settings = make_settings(redis_url, registry_file, api_keys=["k-one", "k-two"])
    with Server(settings) as server, server.client() as http:
        _error(http.get("/v1/models"), 401)
        _error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        _error(http.get("/v1/models", headers={"Authorization": "Basic k-one"}), 401)
        _error(http.post("/v1/jobs", json=JOB), 401)
        ok = http.get("/v1/models", headers={"Authorization": "Bearer k-two"})
        assert ok.status_code == 200
        assert http.get("/healthz").status_code == 200  # probes need no key


def test_rate_limit_per_key(redis_url, registry_file):
    settings = make_settings(redis_url, registry_file, api_keys=["a", "b"], rate_limit_per_minute=2)
    with Server(settings) as server, server.client() as http:
        a, b = ({"Authorization": f"Bearer {k}"} for k in "ab")
        assert http.post("/v1/jobs", json=JOB, headers=a).status_code == 202
        assert http.post("/v1/jobs", json=JOB, headers=a).status_code == 202
        limited = http.post("/v1/jobs", json=JOB, headers=a)
        assert _error(limited, 429)["code"] == "rate_limit_exceeded"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert http.post("/v1/jobs", json=JOB, headers=b).status_code == 202


def test_models_lists_variants_with_manifest_numbers(server):
    with server.client() as http:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert set(models) == {"dit-digits", "t2i-digits"}
    dit = {v["id"]: v for v in models["dit-digits"]["variants"]}
    assert dit["fp32"]["quantized"] is False
    assert dit["w8a8"]["quantized"] and dit["w8a8"]["denoiser_weight_bytes"] > 0
    assert dit["w8a8"]["layers_by_qtype"] and "sqnr_latent_db" in dit["w8a8"]["measured"]
    t2i = {v["id"]: v for v in models["t2i-digits"]["variants"]}
    assert "cpu_kernel_flags" in t2i["w8a8"]["measured_on"]  # where those numbers come from
    assert "seven" in models["dit-digits"]["classes"]
    assert models["t2i-digits"]["kind"] == "text-to-image"
    dit_can, t2i_can = (models[m]["capabilities"] for m in ("dit-digits", "t2i-digits"))
    assert dit_can["negative_prompt"] is False and t2i_can["negative_prompt"] is True
    assert t2i_can["schedulers"] == ["dpm++-2m", "ddim", "euler", "euler-a"]
    assert dit_can["schedulers"] == ["dpm++-2m", "ddim"]
    assert t2i_can["default_scheduler"] == "DPMSolverMultistepScheduler"
    assert t2i_can["quality_steps"]["low"] == 10 and t2i_can["steps"] == [1, 2000]
    assert t2i_can["edits"] and t2i_can["inpainting"] and t2i_can["previews"]
    assert dit_can["edits"] and not dit_can["inpainting"]
    with server.client() as http:  # the response is typed in the OpenAPI document
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
    assert {"ModelList", "ModelInfo", "ModelCapabilities"} <= set(schemas)
    fields = schemas["GenerationRequest"]["properties"]  # the registry's names, documented
    assert fields["model"]["enum"] == ["dit-digits", "t2i-digits"]
    assert "w8a8" in fields["variant"]["enum"] and "auto" in fields["size"]["enum"]
    assert "euler-a" in fields["scheduler"]["enum"]
    with server.client() as http:
        edits = http.get("/openapi.json").json()["paths"]["/v1/images/edits"]["post"]
    form = edits["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["format"] == "binary" and "strength" in form["properties"]
    assert form["properties"]["model"]["enum"] == ["dit-digits", "t2i-digits"]


def test_readiness_is_redis_and_jobs_wait_for_a_worker_unless_required(server):
    """Workers may scale to zero: /readyz wants Redis only, a job for a variant with no worker
    is queued (its wait shows in /v1/models), and a variant marked require_worker refuses."""
    with server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready"}
        assert http.post("/v1/jobs", json=JOB).status_code == 202  # "spare" has no worker
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        spare = {v["id"]: v for v in models["dit-digits"]["variants"]}["spare"]
        assert spare["workers"] == 0 and spare["queue_depth"] == 1
        assert 0 <= spare["oldest_queued_s"] < 30
        assert {v["id"]: v for v in models["dit-digits"]["variants"]}["fp32"][
            "oldest_queued_s"
        ] is None

        strict = {"model": "t2i-digits", "prompt": "a 3", "variant": "strict", "steps": 2}
        refused = http.post("/v1/jobs", json=strict)
        assert _error(refused, 503, "variant")["code"] == "no_workers"
        assert int(refused.headers["retry-after"]) >= 1
        client = redis.Redis.from_url(server.settings.redis_url)
        keys = Keys(server.settings.key_prefix)
        client.zadd(keys.workers("t2i-digits", "strict"), {"w": time.time()})  # a live worker
        assert http.post("/v1/jobs", json=strict).status_code == 202


def test_poison_job_goes_to_dead_letter(server):
    """A job whose worker dies every time it runs it is given up after max_deliveries."""
    settings = server.settings
    keys = Keys(settings.key_prefix)
    client = redis.Redis.from_url(settings.redis_url)

    def consumer(name):
        return Consumer(
            client,
            keys,
            model="dit-digits",
            variant="spare",
            name=name,
            job_ttl_s=settings.job_ttl_s,
            reclaim_idle_s=settings.reclaim_idle_s,
            max_deliveries=settings.max_deliveries,
        )

    with server.client() as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["id"]
        # two workers take it and die without a word (max_deliveries = 2)
        for name in ("doomed-1", "doomed-2"):
            taken = wait_until(lambda n=name: consumer(n).take(1, 100), 10, 0.2, what="take")
            assert [c.job.id for c in taken] == [job_id]
        # the next worker to look finds it poisoned
        survivor = consumer("survivor")
        wait_until(
            lambda: survivor.take(1, 100) == [] and _status(http, job_id) == "failed",
            10,
            0.3,
            what="dead letter",
        )
        view = http.get(f"/v1/jobs/{job_id}").json()
        assert view["error"]["code"] == "dead_letter" and view["deliveries"] == 2
        assert "2 deliveries" in view["error"]["message"]
        dead = client.xrange(keys.dead_letter())
        assert [e[1][b"job"].decode() for e in dead] == [job_id]
        assert client.xlen(keys.stream("dit-digits", "spare")) == 0  # acknowledged and gone


def _status(http, job_id):
    return http.get(f"/v1/jobs/{job_id}").json()["status"]
