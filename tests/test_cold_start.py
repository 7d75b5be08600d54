"""bench.cold_start's pure pieces: which variants it runs, the medians, reading a gauge, the
compiled registry."""

import pytest

from app.config import DEFAULT_REGISTRY
from app.registry import load_registry
from bench.cold_start import compiled_registry, gauge, medians, pick


def test_pick_takes_every_variant_or_the_named_ones():
    registry = load_registry(DEFAULT_REGISTRY)
    every = pick(registry, None)
    assert ("dit-digits", "fp32") in every and ("t2i-digits", "w4a8-sqnr") in every
    assert len(every) == sum(len(s.variants) for s in registry.models.values())
    assert pick(registry, ["t2i-digits/w8a8"]) == [("t2i-digits", "w8a8")]
    for wrong in ("t2i-digits/nope", "t2i-digits", "nope/fp32"):
        with pytest.raises(SystemExit, match="no variant"):
            pick(registry, [wrong])


def test_medians_per_measure_skipping_missing_values():
    runs = [
        {"worker_start_to_heartbeat_s": 4.0, "first_job_total_s": 5.0, "inference_s": 1.0},
        {"worker_start_to_heartbeat_s": 6.0, "first_job_total_s": 9.0, "inference_s": None},
        {"worker_start_to_heartbeat_s": 5.0, "first_job_total_s": 6.0, "inference_s": 3.0},
    ]
    assert medians(runs) == {
        "worker_start_to_heartbeat_s": 5.0,
        "model_load_s": None,
        "warm_up_s": None,
        "first_job_total_s": 6.0,
        "inference_s": 2.0,
    }


def test_gauge_reads_the_sample_of_one_model_variant():
    text = "\n".join(
        [
            "# HELP t2i_model_load_seconds Time to load the pipeline",
            "# TYPE t2i_model_load_seconds gauge",
            't2i_model_load_seconds{model="dit-digits",variant="fp32"} 2.5',
            't2i_model_load_seconds{model="dit-digits",variant="w8a8"} 3.25',
            't2i_model_load_seconds_extra{model="dit-digits",variant="w8a8"} 9.0',
        ]
    )
    assert gauge(text, "t2i_model_load_seconds", "dit-digits", "w8a8") == 3.25
    assert gauge(text, "t2i_model_load_seconds", "t2i-digits", "fp32") is None


def test_compiled_registry_has_the_chosen_variants_compiled(tmp_path):
    registry = load_registry(DEFAULT_REGISTRY)
    chosen = [("dit-digits", "fp32"), ("dit-digits", "w8a8"), ("t2i-digits", "fp32")]
    path = tmp_path / "registry.toml"
    path.write_text(compiled_registry(registry, chosen))
    compiled = load_registry(path)
    assert {(m, v) for m, s in compiled.models.items() for v in s.variants} == set(chosen)
    assert all(v.compile for s in compiled.models.values() for v in s.variants.values())
    dit, original = compiled.get("dit-digits"), registry.get("dit-digits")
    assert dit.labels == original.labels and dit.guidance == original.guidance
    assert dit.variants["w8a8"].manifest == original.variants["w8a8"].manifest
