"""Every family the service serves, as a user meets it: tiny random-weight SD 1.5, SDXL, SD3,
Flux, PixArt-α, PixArt-Σ and DiT pipelines (``tests.families``) saved as folders, quantized by
our package (w8a8-static: int8 weights, static int8 activations, quanto), served by real
workers in fp32 and w8a8, and asked through the official client for everything ``/v1/models``
advertises of them (generations on both variants, edits, inpainting, streamed previews), and
refused what it does not advertise."""

from __future__ import annotations

import json
import time

import numpy as np
import openai
import pytest

from pipelines.capabilities import capabilities
from pipelines.loader import save_pipeline
from quality.metrics import psnr_db
from quantization import QuantizeOptions, open_source, quantize
from quantization.calibration import Conditions
from tests import families
from tests.images import png_bytes, rgb_of
from tests.service.conftest import WorkerProcess, make_settings, serving

RECIPE = "w8a8-static"  # the cheapest w8a8 that calibrates on every family: no SQNR search
STEPS = 3
READY_S = 300.0  # the worker loads and warms up its fourteen variants before it is ready


def _quantize(folder, out, family: str) -> None:
    pipe = open_source(folder)
    if family == "flux":
        # FluxPipeline samples at 128 latent pixels when no size is given (512 px here; the
        # tiny model's is 32): the quantizer's samplings would take a minute
        pipe.default_sample_size = 32 // pipe.vae_scale_factor
    if family == "dit":
        conditions = Conditions("classes", (7, 2), "tests.families")
    else:
        conditions = Conditions("prompts", families.PROMPTS, "tests.families")
    options = QuantizeOptions(
        conditions=conditions,
        num_inference_steps=2,
        guidance_scale=4.0,
        calibration_prompts=2,
        check_images=1,
    )
    quantize(pipe, RECIPE, options=options, source=str(folder)).save(out)


@pytest.fixture(scope="module")
def stack(redis_url, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    registry = []
    start = time.perf_counter()
    for family in families.FAMILIES:
        folder, artifact = root / family / "fp32", root / family / "w8a8"
        save_pipeline(families.build(family, root / family / "tokenizers"), folder)
        _quantize(folder, artifact, family)
        registry.append(
            f'[models.{family}]\nsource = "{folder}"\nsizes = ["32x32"]\n'
            f"default_steps = {STEPS}\nmax_steps = 20\n"
            f'[models.{family}.variants.fp32]\ndtype = "fp32"\n'
            f'[models.{family}.variants.w8a8]\nartifact = "{artifact}"\n'
        )
    built = time.perf_counter() - start
    (root / "registry.toml").write_text("\n".join(registry))
    settings = make_settings(redis_url, root / "registry.toml")
    # one worker process hosts the fourteen variants, as `python -m app` runs them on a device
    served = [(f, v) for f in families.FAMILIES for v in ("fp32", "w8a8")]
    worker = WorkerProcess(settings, serves=served)
    try:
        worker.wait_ready(READY_S)  # longer than serving's own wait
        ready = time.perf_counter() - start
        print(f"built and quantized in {built:.1f} s, the worker ready at {ready:.1f} s")
        with serving(settings, [worker]) as server:
            yield server, root
    finally:
        worker.stop()  # also when it never got ready


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_a_family_does_what_its_model_advertises(stack, family):
    server, root = stack
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with server.client() as http:
        model = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == family)
    advertised = model["capabilities"]
    folder = root / family / "fp32"
    truth = capabilities(
        _class_name(folder / "model_index.json"),
        _class_name(folder / "scheduler" / "scheduler_config.json"),
    )
    assert (advertised["edits"], advertised["inpainting"], advertised["previews"]) == (
        truth.edits,
        truth.inpainting,
        truth.previews,
    )
    variants = {v["id"]: v for v in model["variants"]}
    assert variants["w8a8"]["quantized"] and variants["w8a8"]["recipe"] == RECIPE
    prompt = "a seven" if truth.class_conditional else families.PROMPTS[0]
    ask = {"model": family, "prompt": prompt}

    # generations: fp32, then the quantized variant near it
    images = {}
    for variant in ("fp32", "w8a8"):
        result = client.images.generate(**ask, extra_body={"variant": variant, "seed": 1})
        assert result.model_extra["variant"] == variant and result.model_extra["steps"] == STEPS
        images[variant] = rgb_of(result.data[0].b64_json)
        assert images[variant].shape == (32, 32, 3)
    assert not np.array_equal(images["fp32"], images["w8a8"])  # its own denoiser ran
    assert psnr_db(images["fp32"], images["w8a8"]) > 30, family  # 42-56 dB measured

    # edits: image-to-image (fp32), inpainting (w8a8), or refused naming the field
    source = ("source.png", png_bytes(images["fp32"]), "image/png")
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, 16:] = 0  # transparent: the right half is painted anew
    mask = ("mask.png", png_bytes(np.zeros((32, 32, 3), np.uint8), alpha), "image/png")
    edit = {**ask, "image": source, "extra_body": {"seed": 2, "strength": 0.5, "steps": 4}}
    if advertised["edits"]:
        edited = client.images.edit(**edit)
        assert edited.model_extra["strength"] == 0.5
        pixels = rgb_of(edited.data[0].b64_json)
        assert pixels.shape == (32, 32, 3) and not np.array_equal(pixels, images["fp32"])
    else:
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.edit(**edit)
        assert refused.value.body["param"] == "image"
    masked = {**edit, "mask": mask, "extra_body": {"seed": 2, "variant": "w8a8"}}
    if advertised["inpainting"]:
        painted = client.images.edit(**masked)
        assert painted.model_extra["variant"] == "w8a8"
        assert rgb_of(painted.data[0].b64_json).shape == (32, 32, 3)
    else:
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.edit(**masked)
        assert refused.value.body["param"] in ("image", "mask")

    # a streamed generation: its previews, then the image the plain request made
    assert advertised["previews"]
    events = list(
        client.images.generate(
            **ask, stream=True, partial_images=2, extra_body={"variant": "fp32", "seed": 1}
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    assert np.array_equal(rgb_of(events[-1].b64_json), images["fp32"])
    for preview in events[:2]:
        pixels = rgb_of(preview.b64_json)
        assert pixels.shape == (32, 32, 3) and not np.array_equal(pixels, images["fp32"])


def _class_name(path) -> str:
    return json.loads(path.read_text())["_class_name"]
