"""bench.full_size's variant names, and its run on a one-layer DiT-XL/2-wide model."""

import json

import pytest

from bench import full_size


def test_variant_names_say_recipe_granularity_backend_and_compile():
    assert full_size.parse_variant("fp") == ("fp", None, None, False)
    assert full_size.parse_variant("fp+compile") == ("fp", None, None, True)
    assert full_size.parse_variant("fp+freeze") == ("fp", None, None, True)
    assert full_size.parse_variant("bf16+compile") == ("bf16", None, None, True)
    assert full_size.parse_variant("w8a8-static:token@torchao+compile") == (
        "w8a8-static",
        "token",
        "torchao",
        True,
    )
    assert full_size.parse_variant("w4a8-sqnr") == ("w4a8-sqnr", None, None, False)
    with pytest.raises(ValueError, match="unknown recipe"):
        full_size.parse_variant("w3a3")


def test_the_markdown_table_shows_each_variant_over_the_anchors_of_its_run():
    rows = [
        {"variant": "fp+compile", "step_latency_ms": 1000.0, "ratio_to_fp16": 2.0},
        {
            "variant": "w8a8-static-sqnr@x86+compile",
            "step_latency_ms": 250.0,
            "sqnr_random_db": 33.7,
            "ratio_to_fp16": 0.5,
            "levels": {"w8a8": 90, "w8a8t": 3, "float": 18},
        },
        {"variant": "openvino-bf16", "step_latency_ms": 500.0, "sqnr_random_db": 30.5},
        {"variant": "fp8@torchao", "error": "ValueError: no fp8 here\nsecond line"},
    ]
    table = full_size.markdown({"variants": rows, "ratios": full_size.ratios(rows)})
    lines = table.splitlines()
    assert lines[0].split(" | ")[2:4] == ["× fp+compile", "× openvino-bf16"]
    assert lines[3] == (
        "| w8a8-static-sqnr@x86+compile (w8a8 90, w8a8t 3, float 18) | 250.0 | 0.250× | "
        "0.500× | 33.70 dB | 0.5 |"
    )
    assert lines[4].endswith("| 1.000× | 30.50 dB |  |")
    assert lines[5] == "| fp8@torchao | failed: ValueError: no fp8 here |"
    assert "fp8@torchao" not in full_size.ratios(rows)


def test_a_failing_variant_stops_the_run_unless_asked_to_keep_going(tmp_path):
    out = tmp_path / "fs.json"
    args = ["--layers", "1", "--repeats", "1", "--out", str(out)]
    variants = ["--variants", "fp8:token@torchao", "fp"]  # torchao's fp8 is CUDA-only
    with pytest.raises(ValueError, match="fp8 needs a CUDA device"):
        full_size.main([*args, *variants])
    full_size.main([*args, "--keep-going", *variants])
    result = json.loads(out.read_text())
    failed, fp = result["variants"]
    assert failed["variant"] == "fp8:token@torchao"
    assert "fp8 needs a CUDA device" in failed["error"]
    assert fp["variant"] == "fp" and fp["step_latency_ms"] > 0
    assert result["complete"] is True


@pytest.mark.slow  # a DiT-XL/2-wide block, quantized twice: about 20 s
def test_one_layer_at_full_width_quantizes_on_both_backends(tmp_path):
    out = tmp_path / "fs.json"
    variants = ["fp", "w8a8-static@quanto", "w8a8-static:token@torchao"]
    full_size.main(["--layers", "1", "--repeats", "1", "--out", str(out), "--variants", *variants])
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == set(variants)
    assert rows["w8a8-static@quanto"]["backend"] == "quanto"
    assert rows["w8a8-static:token@torchao"]["backend"] == "torchao"
    for name in variants[1:]:
        assert rows[name]["ratio_to_fp16"] < 0.75  # int8 weights, float embedding tables
        assert rows[name]["sqnr_random_db"] > 20.0
    assert result["command"].startswith("python -m bench.full_size --layers 1")


def test_rounds_time_every_variant_again_in_turn_and_report_the_median(tmp_path):
    out = tmp_path / "fs.json"
    args = ["--layers", "1", "--repeats", "1", "--out", str(out), "--rounds", "3"]
    full_size.main([*args, "--variants", "fp", "fp+compile"])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["variants"]}
    for row in rows.values():
        assert len(row["step_latency_ms_rounds"]) == 3
        assert row["step_latency_ms"] == pytest.approx(
            sorted(row["step_latency_ms_rounds"])[1], abs=0.1
        )
        assert row["step_latency_ms_alone"] > 0
