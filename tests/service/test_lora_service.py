"""LoRA per request through the official client, against the README's registry
(models/registry.toml: both embedded models, fp32, w8a8 compiled and w4a8-sqnr, each with
its trained "italic" adapter) served by one worker as ``make run`` serves it.

The adapter slants the digits; its effect on a variant is the mean slant of the images with
it minus without it (``models.slant``), for the same prompts and seeds. On every quantized
variant the effect is within 10 % of full precision's.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from app.provenance import read_parameters
from app.registry import load_registry
from models.slant import slant
from tests.images import rgb_of
from tests.service.conftest import MODELS, WorkerProcess, make_settings, service_env, serving

pytestmark = pytest.mark.integration

REGISTRY = MODELS / "registry.toml"
VARIANTS = ("fp32", "w8a8", "w4a8-sqnr")
PROMPTS = {  # four requests of n=4 per variant and adapter state: 16 images
    "dit-digits": ["a two", "a four", "a seven", "a five"],
    "t2i-digits": [
        "a red two on a black background",
        "a white four on a blue background",
        "a yellow seven on a green background",
        "a black five on a white background",
    ],
}
STEPS = 12
EFFECT_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def server(redis_url):
    settings = make_settings(redis_url, REGISTRY, generation_timeout_s=240.0)
    registry = load_registry(REGISTRY)
    worker = WorkerProcess(settings, serves=registry.served(), name="lora-all")
    with serving(settings, [worker]) as server:
        yield server


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=240)


def _images(client, model: str, variant: str, lora: list | None) -> np.ndarray:
    def one(k: int) -> list[np.ndarray]:
        extra = {"variant": variant, "seed": 100 + 10 * k, "steps": STEPS}
        if lora is not None:
            extra["lora"] = lora
        out = client.images.generate(model=model, prompt=PROMPTS[model][k], n=4, extra_body=extra)
        return [rgb_of(d.b64_json) for d in out.data]

    with ThreadPoolExecutor(4) as pool:
        return np.stack([p for part in pool.map(one, range(4)) for p in part])


@pytest.mark.parametrize("model", ["dit-digits", "t2i-digits"])
def test_the_adapter_has_the_same_effect_on_every_variant(server, model):
    client = _client(server)
    italic = [{"name": "italic"}]
    effects = {}
    for variant in VARIANTS:
        plain = slant(_images(client, model, variant, None)).mean()
        styled = slant(_images(client, model, variant, italic)).mean()
        effects[variant] = styled - plain
    print(model, {v: round(float(e), 4) for v, e in effects.items()})
    assert effects["fp32"] > 0.15, effects  # it slants the digits
    for variant in VARIANTS[1:]:
        ratio = effects[variant] / effects["fp32"]
        assert abs(ratio - 1) <= EFFECT_TOLERANCE, (variant, effects)


@pytest.mark.parametrize("model", ["dit-digits", "t2i-digits"])
def test_the_same_request_gives_the_same_pixels_and_its_metadata_makes_it_again(server, model):
    client = _client(server)
    sha = load_registry(REGISTRY).models[model].adapters["italic"].sha256
    for variant in VARIANTS:
        asked = {"variant": variant, "seed": 5, "steps": STEPS, "lora": [{"name": "italic"}]}
        first = client.images.generate(model=model, prompt=PROMPTS[model][0], extra_body=asked)
        again = client.images.generate(model=model, prompt=PROMPTS[model][0], extra_body=asked)
        assert np.array_equal(rgb_of(first.data[0].b64_json), rgb_of(again.data[0].b64_json))
        params = read_parameters(base64.b64decode(first.data[0].b64_json))
        assert params["lora"] == [{"name": "italic", "scale": 1.0, "sha256": sha}]
        remade = client.images.generate(
            model=model,
            prompt=params["prompt"],
            size=params["size"],
            extra_body={
                **{k: params[k] for k in ("variant", "seed", "steps", "guidance_scale")},
                "lora": params["lora"],
            },
        )
        assert np.array_equal(rgb_of(remade.data[0].b64_json), rgb_of(first.data[0].b64_json))
        plain = client.images.generate(
            model=model, prompt=PROMPTS[model][0], extra_body={**asked, "lora": []}
        )
        assert not np.array_equal(rgb_of(plain.data[0].b64_json), rgb_of(first.data[0].b64_json))


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ([{"name": "bold"}], "has no adapter 'bold'"),
        ([{"name": "italic", "scale": 100}], "must lie in -2..2; got 100"),
        ([{"name": "italic"}, {"name": "italic", "scale": 0.5}], "names 'italic' twice"),
    ],
)
def test_bad_lora_gets_400_naming_lora(server, lora, message):
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="t2i-digits", prompt="a two", extra_body={"lora": lora})
    assert caught.value.body["param"] == "lora" and message in caught.value.body["message"]


def test_edits_jobs_and_compare_take_lora(server):
    client = _client(server)
    start = client.images.generate(model="t2i-digits", prompt="a red two on a black background")
    png = base64.b64decode(start.data[0].b64_json)
    italic = [{"name": "italic", "scale": 0.8}]
    # the official client sends a list in a multipart form as lora[][name], lora[][scale]
    edited = client.images.edit(
        model="t2i-digits", image=("two.png", png, "image/png"), prompt="a red two on a black "
        "background", extra_body={"lora": italic, "seed": 3, "steps": STEPS},
    )  # fmt: skip
    assert read_parameters(base64.b64decode(edited.data[0].b64_json))["lora"][0]["scale"] == 0.8
    with server.client() as http:
        job = http.post(
            "/v1/jobs",
            json={"model": "dit-digits", "prompt": "a three", "steps": 4, "lora": italic},
        )
        assert job.status_code == 202, job.text
        compared = http.post(
            "/v1/compare",
            json={"model": "dit-digits", "prompt": "a three", "steps": 6, "lora": italic},
            timeout=240,
        ).json()
        assert [r["status"] for r in compared["variants"]] == ["completed"] * 3
        for row in compared["variants"]:
            assert row["parameters"]["lora"][0]["name"] == "italic"
            assert row["quantized"] is False or row["psnr_db"] is not None
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert [a["name"] for a in models["t2i-digits"]["adapters"]] == ["italic"]


def test_a_tampered_or_mismatched_adapter_stops_the_worker_naming_the_file(redis_url, tmp_path):
    registry = load_registry(REGISTRY)
    shipped = registry.models["dit-digits"].adapters["italic"]
    damaged = tmp_path / "italic.safetensors"
    data = bytearray(shipped.file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped byte in the tensors
    damaged.write_bytes(bytes(data))
    other = registry.models["t2i-digits"].adapters["italic"]  # the UNet's, on the DiT
    for file, sha, why in (
        (damaged, shipped.sha256, "sha256"),
        (other.file, other.sha256, "is it an adapter of dit-digits?"),
    ):
        path = tmp_path / "registry.toml"
        path.write_text(
            f'[models.dit-digits]\nsource = "{MODELS / "dit-digits"}"\n'
            f'[models.dit-digits.adapters.italic]\nfile = "{file}"\nsha256 = "{sha}"\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "app.worker", "--serve", "dit-digits/fp32"],
            env=service_env(make_settings(redis_url, path)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert str(file) in done.stderr and why in done.stderr, done.stderr[-2000:]


def test_the_playground_compares_every_variant_with_the_same_adapter(server, tmp_path):
    """In a real Chromium: the adapter menu lists the model's adapter and takes its default
    scale; the comparison runs it on fp32, w8a8 and w4a8-sqnr, and each card's parameters
    name it."""
    from playwright.sync_api import expect, sync_playwright

    from tests.service.test_playground import CHROMIUM, FLAGS, _chromium_or_fail

    _chromium_or_fail()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url + "/")
        expect(page.locator("#model option")).to_have_count(2)
        page.select_option("#model", "dit-digits")
        expect(page.locator("#lora option")).to_have_count(2)  # none, italic
        page.select_option("#lora", "italic")
        expect(page.locator("#lora-scale")).to_have_value("1")
        page.fill("#lora-scale", "0.9")
        page.fill("#prompt", "seven")
        page.fill("#steps", str(STEPS))
        page.fill("#previews", "0")
        page.click("#run")
        expect(page.locator("#results")).to_have_attribute(
            "data-status", "completed", timeout=240_000
        )
        for variant in VARIANTS:
            card = page.locator(f'.card[data-variant="{variant}"]')
            lora = json.loads(card.locator('dd[data-parameter="lora"]').text_content())
            assert [(a["name"], a["scale"]) for a in lora] == [("italic", 0.9)], lora
        psnr = page.locator('.card[data-variant="w4a8-sqnr"] dd[data-metric="psnr_db"]')
        expect(psnr).to_have_count(1)
        expect(page.locator("#error")).to_be_hidden()
        page.screenshot(path=str(tmp_path / "playground-lora.png"), full_page=True)
        browser.close()
