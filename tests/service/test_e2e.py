"""The whole service: real redis-server, the API in uvicorn, real worker processes running the
embedded models, called through HTTP, SSE and the official openai client."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from app.provenance import read_parameters
from tests.images import png_bytes, rgb_of
from tests.service.conftest import (
    MODELS,
    Server,
    WorkerProcess,
    free_port,
    make_settings,
    serving,
    wait_until,
)
from tests.waiting import read_events


@pytest.fixture(scope="module")
def stack(redis_url, registry_file):
    settings = make_settings(redis_url, registry_file)
    workers = {
        "dit-a": WorkerProcess(settings, "dit-digits", "fp32", name="dit-a"),
        "dit-b": WorkerProcess(settings, "dit-digits", "fp32", name="dit-b"),
        "dit-w8a8": WorkerProcess(settings, "dit-digits", "w8a8", name="dit-w8a8"),
        "t2i": WorkerProcess(settings, "t2i-digits", "fp32", name="t2i"),
    }
    with serving(settings, workers.values()) as server:
        yield server, workers


def _wait_job(http, job_id, predicate, timeout=60.0, what="job state"):
    return wait_until(
        lambda: (v := http.get(f"/v1/jobs/{job_id}").json()) and predicate(v) and v,
        timeout,
        0.05,
        what=what,
    )


def test_openai_client_generates_images(stack):
    server, _ = stack
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        model="dit-digits", prompt="seven", n=2, size="32x32", extra_body={"seed": 11, "steps": 8}
    )
    images = [rgb_of(d.b64_json) for d in result.data]
    assert len(images) == 2 and images[0].shape == (32, 32, 3)
    assert not np.array_equal(images[0], images[1])  # image i is seeded with seed + i
    again = client.images.generate(
        model="dit-digits", prompt="7", n=2, size="32x32", extra_body={"seed": 11, "steps": 8}
    )
    pixels = [rgb_of(d.b64_json) for d in again.data]
    assert all(np.array_equal(a, b) for a, b in zip(pixels, images, strict=True))  # same bits
    alone = client.images.generate(
        model="dit-digits", prompt="7", n=1, size="32x32", extra_body={"seed": 11, "steps": 8}
    )
    # alone, the same seed gives the same noise; only float rounding of another batch shape
    # may differ
    diff = np.abs(rgb_of(alone.data[0].b64_json).astype(int) - images[0])
    assert diff.max() <= 8
    for free in ("a seven", "the digit 7, please", "Seven!"):  # free prompts name class 7
        said = client.images.generate(
            model="dit-digits", prompt=free, n=2, size="32x32", extra_body={"seed": 11, "steps": 8}
        )
        pixels = [rgb_of(d.b64_json) for d in said.data]
        assert all(np.array_equal(a, b) for a, b in zip(pixels, images, strict=True))
        # the file differs only in what it says was asked
        assert read_parameters(base64.b64decode(said.data[0].b64_json))["prompt"] == free
    extra = result.model_extra
    assert extra["seed"] == 11 and extra["variant"] == "fp32" and extra["steps"] == 8
    assert extra["timings"]["inference_s"] > 0

    urls = client.images.generate(
        model="t2i-digits",
        prompt="a red seven on a black background",
        response_format="url",
        extra_body={"output_format": "webp", "seed": 1},
    )
    assert urls.data[0].url.startswith("/v1/jobs/")  # relative: never built from Host
    fetched = httpx.get(server.url + urls.data[0].url)
    assert fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).size == (32, 32)
    sizes = {}
    for level in (5, 95):
        webp = client.images.generate(
            model="t2i-digits",
            prompt="a red seven on a black background",
            size="auto",
            quality="low",
            output_format="webp",
            output_compression=level,
            extra_body={"seed": 1},
        )
        assert webp.model_extra["steps"] == 10  # low: half the default 20
        sizes[level] = len(base64.b64decode(webp.data[0].b64_json))
    assert sizes[5] < sizes[95]


def test_an_image_made_again_from_its_own_metadata_is_the_same(stack):
    server, _ = stack
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for model, prompt, variant, scheduler in (
        ("t2i-digits", "a blue four on a black background", "fp32", "euler-a"),
        ("dit-digits", "a four", "w8a8", None),
    ):
        asked = {"variant": variant, "seed": 77, "steps": 6}
        if scheduler:
            asked["scheduler"] = scheduler
        first = client.images.generate(model=model, prompt=prompt, extra_body=asked)
        data = base64.b64decode(first.data[0].b64_json)
        params = read_parameters(data)
        assert (params["model"], params["variant"], params["seed"]) == (model, variant, 77)
        assert params["scheduler"] == (scheduler or "dpm++-2m")
        if variant != "fp32":  # which artifact made it
            manifest = MODELS / "quantized" / f"{model}-{variant}" / "manifest.json"
            assert params["artifact_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
            assert params["recipe"] == "w8a8"
        again = client.images.generate(
            model=params["model"],
            prompt=params["prompt"],
            size=params["size"],
            extra_body={
                k: params[k] for k in ("variant", "seed", "steps", "guidance_scale", "scheduler")
            },
        )
        remade = base64.b64decode(again.data[0].b64_json)
        assert np.array_equal(rgb_of(remade), rgb_of(data)) and read_parameters(remade) == params


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_schedulers_give_other_images_and_say_so(stack):
    client = _client(stack[0])
    seen = {}
    for scheduler in ("dpm++-2m", "ddim", "euler"):
        result = client.images.generate(
            model="t2i-digits",
            prompt="a red seven on a black background",
            extra_body={"seed": 4, "steps": 10, "scheduler": scheduler, "negative_prompt": "blue"},
        )
        assert result.model_extra["scheduler"] == scheduler
        assert result.model_extra["negative_prompt"] == "blue"
        seen[scheduler] = rgb_of(result.data[0].b64_json)
    default = client.images.generate(
        model="t2i-digits",
        prompt="a red seven on a black background",
        extra_body={"seed": 4, "steps": 10, "negative_prompt": "blue"},
    )
    assert np.array_equal(rgb_of(default.data[0].b64_json), seen["dpm++-2m"])
    assert not np.array_equal(seen["ddim"], seen["dpm++-2m"])
    assert not np.array_equal(seen["euler"], seen["dpm++-2m"])


def test_streamed_generation_gives_partial_images_then_the_image(stack):
    client = _client(stack[0])
    prompt, extra = "a green two on a black background", {"seed": 21, "steps": 20}
    events = list(
        client.images.generate(
            model="t2i-digits", prompt=prompt, stream=True, partial_images=2, extra_body=extra
        )
    )
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert events[-1].size == "32x32" and events[-1].output_format == "png"
    final = rgb_of(events[-1].b64_json)
    plain = client.images.generate(model="t2i-digits", prompt=prompt, extra_body=extra)
    assert np.array_equal(final, rgb_of(plain.data[0].b64_json))
    previews = [rgb_of(e.b64_json) for e in events[:2]]
    distance = [np.abs(p.astype(int) - final).mean() for p in previews]
    # each is the prediction of the clean image at its step: the later, the nearer the end
    assert distance[1] < distance[0] and all(not np.array_equal(p, final) for p in previews)
    # a DiT stream, and fewer previews than asked when there are fewer steps
    few = list(
        client.images.generate(
            model="dit-digits",
            prompt="a nine",
            stream=True,
            partial_images=3,
            extra_body={"steps": 3},
        )
    )
    assert [e.type for e in few] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]


def test_openai_client_edits_with_and_without_a_mask(stack):
    client = _client(stack[0])
    made = client.images.generate(
        model="t2i-digits", prompt="a red seven on a black background", extra_body={"seed": 8}
    )
    source = rgb_of(made.data[0].b64_json)
    whole = client.images.edit(
        model="t2i-digits",
        image=("seven.png", png_bytes(source), "image/png"),
        prompt="a green three on a black background",
        extra_body={"seed": 5, "strength": 0.7},
    )
    assert whole.model_extra["strength"] == 0.7 and whole.model_extra["steps"] == 20
    edited = rgb_of(whole.data[0].b64_json)
    assert edited.shape == source.shape and not np.array_equal(edited, source)
    again = client.images.edit(  # the same request, the same pixels
        model="t2i-digits",
        image=("seven.png", png_bytes(source), "image/png"),
        prompt="a green three on a black background",
        extra_body={"seed": 5, "strength": 0.7},
    )
    assert np.array_equal(rgb_of(again.data[0].b64_json), edited)
    params = read_parameters(base64.b64decode(whole.data[0].b64_json))
    assert params["strength"] == 0.7 and len(params["image_sha256"]) == 64

    alpha = np.full(source.shape[:2], 255, np.uint8)
    alpha[:, 16:] = 0  # transparent: the right half is painted anew
    masked = client.images.edit(
        model="t2i-digits",
        image=("seven.png", png_bytes(source), "image/png"),
        mask=("mask.png", png_bytes(np.zeros_like(source), alpha), "image/png"),
        prompt="a blue one on a black background",
        extra_body={"seed": 5},
    )
    assert masked.model_extra["strength"] == 1.0  # inpainting's default
    painted = rgb_of(masked.data[0].b64_json)
    change = np.abs(painted.astype(int) - source).mean(axis=2)
    inside, outside = change[:, 16:].mean(), change[:, :16].mean()
    assert inside > 1.5 * outside, (inside, outside)

    dit = client.images.edit(  # DiT: image-to-image by its own loop
        model="dit-digits",
        image=("seven.png", png_bytes(source), "image/png"),
        prompt="a three",
        extra_body={"seed": 5, "strength": 0.5, "steps": 10},
    )
    assert rgb_of(dit.data[0].b64_json).shape == (32, 32, 3)
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(
            model="dit-digits",
            image=("seven.png", png_bytes(source), "image/png"),
            mask=("mask.png", png_bytes(np.zeros_like(source), alpha), "image/png"),
            prompt="a three",
        )
    assert refused.value.body["param"] == "mask"

    stream = client.images.edit(
        model="t2i-digits",
        image=("seven.png", png_bytes(source), "image/png"),
        prompt="a green three on a black background",
        stream=True,
        partial_images=2,
        extra_body={"seed": 5, "strength": 0.7},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert np.array_equal(rgb_of(events[-1].b64_json), edited)


def test_a_job_with_an_image_sends_its_previews_on_its_events(stack):
    server, _ = stack
    source = np.zeros((32, 32, 3), np.uint8)
    source[8:24, 12:20] = 220
    body = {
        "model": "t2i-digits",
        "prompt": "a red one on a black background",
        "image": "data:image/png;base64," + base64.b64encode(png_bytes(source)).decode(),
        "strength": 0.6,
        "steps": 10,
        "partial_images": 2,
    }
    with server.client() as http:
        job = http.post("/v1/jobs", json=body)
        assert job.status_code == 202, job.text
        events = _events(http, job.json()["id"])
        previews = [e["data"] for e in events if e["event"] == "preview"]
        assert [p["index"] for p in previews] == [0, 1] and [p["step"] for p in previews] == [2, 4]
        progress = [e["data"]["step"] for e in events if e["event"] == "progress"]
        assert progress == list(range(1, 7))  # 0.6 of 10 steps run
        view = http.get(f"/v1/jobs/{job.json()['id']}").json()
        assert view["status"] == "completed" and view["steps"] == 6
        assert view["previews"] == [p["url"] for p in previews]
        fetched = http.get(previews[1]["url"])
        assert fetched.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (32, 32)
        assert http.get(previews[1]["url"] + "?image=1").status_code == 404  # n = 1


def test_openai_client_error_classes(stack, redis_url, registry_file):
    server, _ = stack
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="dit-digits", prompt="seven", size="1024x1024")
    assert bad.value.body["param"] == "size"
    refused = {  # OpenAI parameters this service cannot honour, each named in the error
        "background": {"background": "transparent"},
        "style": {"style": "vivid"},
        "moderation": {"moderation": "auto"},
        "output_compression": {"output_compression": 50},  # with png
        "sharpness": {"extra_body": {"sharpness": 2}},  # unknown: refused, not ignored
    }
    for param, kwargs in refused.items():
        with pytest.raises(openai.BadRequestError) as no:
            client.images.generate(model="dit-digits", prompt="seven", **kwargs)
        assert no.value.body["param"] == param, no.value.body
    for prompt in ("a cat on a sofa", "a 7 and a 1"):  # no class, two classes
        with pytest.raises(openai.BadRequestError) as unnamed:
            client.images.generate(model="dit-digits", prompt=prompt)
        assert unnamed.value.body["param"] == "prompt"
        assert unnamed.value.body["code"] == "invalid_value"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="seven")
    keyed = make_settings(redis_url, registry_file, api_keys=["secret"], queue_max=1)
    with Server(keyed) as guarded:
        denied = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            denied.images.generate(model="dit-digits", prompt="seven")
        allowed = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="secret", max_retries=0)
        with guarded.client(headers={"Authorization": "Bearer secret"}) as http:
            job = {"model": "dit-digits", "prompt": "one", "variant": "spare"}
            assert http.post("/v1/jobs", json=job).status_code == 202  # nobody serves "spare"
        with pytest.raises(openai.RateLimitError) as limited:
            allowed.images.generate(
                model="dit-digits", prompt="two", extra_body={"variant": "spare"}
            )
        assert int(limited.value.response.headers["retry-after"]) >= 1


def _events(http, job_id, last_event_id=None):
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        return read_events(response)


def test_sse_progress_per_step_and_resume(stack):
    server, _ = stack
    with server.client() as http:
        job = http.post("/v1/jobs", json={"model": "dit-digits", "prompt": "3", "steps": 12}).json()
        events = _events(http, job["id"])
        progress = [e["data"]["step"] for e in events if e["event"] == "progress"]
        assert progress == list(range(1, 13))
        assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "completed"
        statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
        assert statuses == ["queued", "in_progress", "completed"]
        # resume after the fifth event: exactly the rest comes again
        resumed = _events(http, job["id"], last_event_id=events[4]["id"])
        assert [e["id"] for e in resumed] == [e["id"] for e in events[5:]]
        view = http.get(f"/v1/jobs/{job['id']}").json()
        assert view["status"] == "completed" and view["progress"] == 100
        t = view["timings"]
        assert t["total_s"] >= t["inference_s"] > 0 and t["queue_wait_s"] >= 0
        image = http.get(view["images"][0])
        assert image.headers["content-type"] == "image/png"


def test_cancel_a_running_job_stops_it(stack):
    server, _ = stack
    with server.client() as http:
        long = {"model": "t2i-digits", "prompt": "a blue two on white", "steps": 2000, "n": 4}
        job = http.post("/v1/jobs", json=long).json()
        _wait_job(http, job["id"], lambda v: v["step"] >= 2, what="the job to run")
        t0 = time.monotonic()
        asked = http.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert asked["cancel_requested"] and asked["status"] == "in_progress"
        done = _wait_job(http, job["id"], lambda v: v["status"] == "cancelled", 30)
        assert time.monotonic() - t0 < 10
        assert done["progress"] < 100 and done["images"] == []
        assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        # the worker lives on
        after = http.post("/v1/jobs", json={"model": "t2i-digits", "prompt": "a 1", "steps": 4})
        _wait_job(http, after.json()["id"], lambda v: v["status"] == "completed", 60)


def test_sigkilled_worker_job_completes_on_another(stack):
    server, workers = stack
    with server.client() as http:
        long = {"model": "dit-digits", "prompt": "nine", "steps": 1500, "n": 2, "seed": 5}
        job = http.post("/v1/jobs", json=long).json()
        running = _wait_job(http, job["id"], lambda v: v["step"] >= 1, what="the job to run")
        victim = running["worker"]
        workers[victim].kill()
        survivor = "dit-b" if victim == "dit-a" else "dit-a"
        done = _wait_job(http, job["id"], lambda v: v["status"] == "completed", 120)
        assert done["deliveries"] == 2 and done["result"]["worker"] == survivor
        assert len(done["images"]) == 2
    workers[victim] = WorkerProcess(server.settings, "dit-digits", "fp32", name=victim).wait_ready()


def test_compare_fp_against_quantized(stack):
    server, _ = stack
    with server.client() as http:
        body = {"model": "dit-digits", "prompt": "four", "variants": ["fp32", "w8a8"], "seed": 2}
        response = http.post("/v1/compare", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["reference"] == "fp32" and result["seed"] == 2
        rows = {r["variant"]: r for r in result["variants"]}
        assert all(r["status"] == "completed" and r["b64_png"] for r in rows.values())
        assert rows["fp32"]["psnr_db"] is None  # the reference
        q = rows["w8a8"]
        assert q["quantized"] and 5 < q["psnr_db"] < 80 and -1 <= q["ssim"] <= 1
        assert q["sqnr_latent_db"] is not None and q["peak_memory_bytes"] > 0
        assert q["denoiser_weight_bytes"] < rows["fp32"]["denoiser_weight_bytes"]
        scrape = http.get("/metrics").text
        assert 't2i_fidelity_psnr_db{model="dit-digits",variant="w8a8"}' in scrape
        # the same comparison, read back by id; an async one answers 202 at once
        again = http.get(f"/v1/comparisons/{result['id']}").json()
        assert again["status"] == "completed"
        assert {r["variant"]: r["psnr_db"] for r in again["variants"]}["w8a8"] == q["psnr_db"]
        started = http.post("/v1/comparisons", json={**body, "seed": 9})
        assert started.status_code == 202 and started.json()["status"] == "in_progress"
        assert all(r["status"] in ("queued", "in_progress") for r in started.json()["variants"])
        assert http.get("/v1/comparisons/nope").status_code == 404
        _error = http.post("/v1/compare", json={**body, "variants": ["fp32", "w9"]})
        assert _error.status_code == 404 and _error.json()["error"]["param"] == "variant"


def test_shadow_compares_feed_the_fidelity_gauges(stack, tmp_path):
    from app import metrics

    server, _ = stack
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f"""
[models.dit-digits]
source = "{MODELS / "dit-digits"}"
shadow_prompt = "five"
[models.dit-digits.variants.fp32]
dtype = "fp32"
[models.dit-digits.variants.w8a8]
artifact = "{MODELS / "quantized" / "dit-digits-w8a8"}"
[models.dit-digits.variants.spare]
dtype = "fp32"
"""
    )
    settings = server.settings.model_copy(update={"registry": registry, "shadow_compare_s": 0.2})
    metrics.FIDELITY_SQNR.clear()
    with Server(settings) as shadowing, shadowing.client() as http:
        wait_until(
            lambda: (
                't2i_fidelity_sqnr_db{model="dit-digits",variant="w8a8"}'
                in http.get("/metrics").text
            ),
            60,
            0.2,
            what="a shadow compare",
        )
        # a variant with no live worker (scaled to zero) is left out, not woken
        variants = http.get("/v1/models").json()["data"][0]["variants"]
        assert {v["id"]: v["queue_depth"] for v in variants}["spare"] == 0


def test_ready_and_metrics(stack):
    server, _ = stack
    with server.client() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert {v["id"]: v for v in models["dit-digits"]["variants"]}["fp32"]["workers"] == 2
        scrape = http.get("/metrics").text
        for name in ("t2i_http_requests_total", "t2i_queue_depth", "t2i_workers_live"):
            assert name in scrape


def test_worker_metrics_port_and_sigterm(stack):
    server, _ = stack
    port = free_port()
    worker = WorkerProcess(server.settings, "t2i-digits", "fp32", "t2i-metrics", port).wait_ready()
    scrape = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 't2i_model_load_seconds{model="t2i-digits",variant="fp32"}' in scrape
    assert "t2i_denoiser_weight_bytes" in scrape
    assert worker.stop() == 0  # SIGTERM: a clean exit


def test_api_process_never_imports_torch():
    code = (
        "import sys; from app.main import create_app; "
        "from app.api import compare, generations, jobs, models, health; "
        "create_app(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
