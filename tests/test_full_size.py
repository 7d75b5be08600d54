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
