"""Pure units of the service: registry, settings, request resolution, job records."""

from __future__ import annotations

import numpy as np
import pytest

from app.config import Settings
from app.errors import InvalidRequest, NotFound
from app.labels import Match, find_class, label_key
from app.queue.records import JobRequest, JobStatus, decode, encode_new
from app.registry import RegistryError, load_registry
from app.resolve import Ask, job_request
from tests.service.conftest import MODELS


def _registry(tmp_path, text):
    path = tmp_path / "registry.toml"
    path.write_text(text)
    return load_registry(path)


def test_shipped_registry_serves_both_models_with_their_artifacts():
    registry = load_registry(MODELS / "registry.toml")
    assert set(registry.models) == {"dit-digits", "t2i-digits"}
    for spec in registry.models.values():
        assert set(spec.variants) == {"fp32", "w8a8", "w4a8-sqnr"}
        assert spec.variants["w4a8-sqnr"].manifest["recipe"]["name"] == "w4a8-sqnr"
    dit = registry.get("dit-digits")
    assert dit.kind == "class-conditional" and dit.class_id("Seven") == dit.class_id("7") == 7
    assert registry.get("t2i-digits").kind == "text-to-image"
    assert dit.default_steps == 20 and dit.guidance == 5.0  # from the folder's defaults.json


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"no \[models\.NAME\]"),
        ("[models.a]\ndevice='cpu'", "models.a.source: Field required"),
        (f"[models.a]\nsource='{MODELS / 't2i-digits'}'\nkind='video'", "models.a.kind: Input"),
        (f"[models.a]\nsource='{MODELS / 't2i-digits'}'\nstep=3", "models.a.step: not a key"),
        (
            f"[models.a]\nsource='{MODELS / 't2i-digits'}'\n[models.a.variants.x]\ndtype='int3'",
            "models.a.variants.x.dtype: Input should be 'fp32', 'fp16' or 'bf16'",
        ),
        (
            f"[models.a]\nsource='{MODELS / 't2i-digits'}'\n"
            "[models.a.variants.q]\nartifact='/nope'",
            "not a quantized artifact",
        ),
        (f"[models.a]\nsource='{MODELS / 't2i-digits'}'\ndefault_variant='w9'", "default_variant"),
        (f"[models.a]\nsource='{MODELS / 't2i-digits'}'\nsizes=['big']", "is not WxH"),
        (f"[models.a]\nsource='{MODELS / 't2i-digits'}'\nguidance=50.0", "outside guidance_range"),
        ("[models.a]\nsource='some/hub-id'\nkind='class-conditional'", "needs id2label.json"),
        ("[models", "cannot read"),
    ],
)
def test_registry_errors_name_the_entry(tmp_path, text, message):
    with pytest.raises(RegistryError, match=message):
        _registry(tmp_path, text)


def test_settings_validate_at_start(monkeypatch):
    monkeypatch.setenv("T2I_API_KEYS", " one, two ,")
    assert Settings().api_keys == ["one", "two"]
    with pytest.raises(ValueError, match="half of reclaim_idle_s"):
        Settings(reclaim_idle_s=2.0, heartbeat_s=1.5)
    with pytest.raises(ValueError):
        Settings(queue_max=0)


def test_resolution_fills_defaults_and_draws_a_seed():
    registry = load_registry(MODELS / "registry.toml")
    settings = Settings()
    r = job_request(settings, registry, Ask(model="t2i-digits", prompt="a red 7 on black"))
    assert (r.variant, r.steps, r.guidance_scale, r.width, r.height) == ("fp32", 20, 4.5, 32, 32)
    assert 0 <= r.seed < 2**31 and r.class_id is None
    d = job_request(settings, registry, Ask(model="dit-digits", prompt=" Seven ", variant="w8a8"))
    assert d.class_id == 7 and d.variant == "w8a8"
    for unknown in ("w2", ""):  # an empty name is no name, not the default
        with pytest.raises(NotFound) as missing:
            job_request(settings, registry, Ask(model="dit-digits", prompt="7", variant=unknown))
        assert missing.value.param == "variant" and missing.value.status == 404
    with pytest.raises(InvalidRequest) as bad:
        job_request(settings, registry, Ask(model="dit-digits", prompt="7", steps=101))
    assert bad.value.param == "steps"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a seven", 7),
        ("the digit 7, please", 7),
        ("Seven!", 7),
        ("SEVEN", 7),
        ("a seven-ish shape", 7),
        ("seventy", None),  # whole words only
        ("a 7 or a one", None),  # two classes: ambiguous
        ("a cat", None),
        ("", None),
    ],
)
def test_free_prompts_name_a_class_by_whole_words(prompt, expected):
    spec = load_registry(MODELS / "registry.toml").get("dit-digits")
    assert spec.class_id(prompt) == expected


def test_the_most_specific_label_wins_and_two_classes_are_refused():
    labels = {label_key(k): v for k, v in {"retriever": 1, "golden retriever": 207}.items()}
    labels[label_key("Tiger Cat")] = 282
    assert find_class("a golden Retriever on grass", labels) == Match(207, ("golden retriever",))
    assert find_class("one retriever", labels).class_id == 1
    assert find_class("a tiger cat and a retriever", labels).class_id is None
    registry, settings = load_registry(MODELS / "registry.toml"), Settings()
    with pytest.raises(InvalidRequest, match=r"several classes.*7.*1") as two:
        job_request(settings, registry, Ask(model="dit-digits", prompt="a 7 next to a 1"))
    with pytest.raises(InvalidRequest, match="must name one of its classes") as none:
        job_request(settings, registry, Ask(model="dit-digits", prompt="a cat"))
    assert two.value.param == none.value.param == "prompt"


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_images_carry_their_parameters_in_every_format(output_format):
    from app.provenance import image_parameters, read_parameters
    from app.worker.pipeline import encode_image

    registry = load_registry(MODELS / "registry.toml")
    r = job_request(
        Settings(), registry, Ask(model="t2i-digits", prompt="a red 7 — «quoted»", seed=5)
    )
    params = image_parameters(r, 1, {"model": "t2i-digits", "variant": "fp32"})
    pixels = np.zeros((32, 32, 3), np.uint8)
    data = encode_image(pixels, output_format, None, params)
    assert read_parameters(data) == params and params["seed"] == 6
    assert params["prompt"] == "a red 7 — «quoted»"  # non-ASCII survives the ASCII EXIF tag
    assert read_parameters(encode_image(pixels, output_format)) is None


def test_compare_variants_are_checked_by_name():
    from app.comparison import check_variants

    spec = load_registry(MODELS / "registry.toml").get("dit-digits")
    assert check_variants(Settings(), spec, None, None) == (list(spec.variants), "fp32")
    for names in ([""], ["fp32", "nope"]):  # found by the API fuzzer: "" was a 500
        with pytest.raises(NotFound) as missing:
            check_variants(Settings(), spec, names, None)
        assert missing.value.param == "variant"


def test_job_record_round_trip_and_timings():
    request = JobRequest("m", "v", "p", 2, 32, 32, 10, 5.0, 3)
    fields = encode_new("abc", request, now=100.0)
    job = decode({k.encode(): v.encode() for k, v in fields.items()})
    assert job.status == JobStatus.QUEUED and job.request == request
    assert job.timings == {"queue_wait_s": None, "inference_s": None, "total_s": None}
    job.started_at, job.finished_at = 100.5, 102.0
    assert job.timings == {"queue_wait_s": 0.5, "inference_s": 1.5, "total_s": 2.0}
    assert request.batch_key() == JobRequest("m", "v", "other", 1, 32, 32, 10, 5.0, 9).batch_key()


def test_stream_ids_are_parsed_strictly():
    from app.queue.listener import stream_id

    assert stream_id("0-0") == (0, 0) and stream_id("1733000000000-12") == (1733000000000, 12)
    for bad in ("", "1", "1-", "-1", "1-2-3", "x-1", "¹-0", "٣-0", "99999999999999999999-0"):
        assert stream_id(bad) is None, bad
    assert stream_id(f"{2**64 - 1}-0") == (2**64 - 1, 0)


def test_ids_have_one_format():
    from app.queue.records import is_id

    assert is_id("0123456789abcdef0123456789abcdef")
    for bad in ("", "f" * 31, "f" * 33, "F" * 32, "f" * 31 + ":", "f" * 32 + ":events"):
        assert not is_id(bad), bad


def test_sizes_have_one_format():
    from app.sizes import Size, parse_size

    assert parse_size("512x768") == Size(512, 768) and parse_size("32X32") == Size(32, 32)
    assert str(parse_size("512x768")) == "512x768"
    for bad in ("", "big", "512", "512x", "x512", "0x512", "-1x5", " 32x32", "3_2x32", "1x2x3"):
        with pytest.raises(ValueError, match="not WxH"):
            parse_size(bad)


def test_registry_switches_apply_per_model_and_per_variant(tmp_path):
    registry = _registry(
        tmp_path,
        f"""
[models.a]
source = '{MODELS / "t2i-digits"}'
compile = true
[models.a.variants.fast]
dtype = 'fp32'
[models.a.variants.eager]
dtype = 'fp32'
compile = false
require_worker = true
""",
    )
    spec = registry.get("a")
    assert spec.variants["fast"].compile and not spec.variants["fast"].require_worker
    assert not spec.variants["eager"].compile and spec.variants["eager"].require_worker
    assert spec.guidance == 4.5 and spec.default_steps == 20  # the folder's defaults.json
    for key in ("compile", "require_worker"):
        with pytest.raises(RegistryError, match=f"models.a.{key}: Input should be a valid bool"):
            _registry(tmp_path, f"[models.a]\nsource='{MODELS / 't2i-digits'}'\n{key}='yes'")
