"""bench.lora_fidelity: it measures the registry's variants; its Markdown is its JSON."""

import json
from pathlib import Path

from bench import lora_fidelity


def test_the_variants_are_the_registrys_in_its_order():
    for model in ("dit-digits", "t2i-digits"):
        found = lora_fidelity.variants(model)
        assert [v for v, _, _ in found] == ["fp32", "w8a8", "w4a8-sqnr"]
        assert found[0][2] == "fp32" and found[0][1].name == model
        for _, folder, dtype in found[1:]:
            assert dtype is None and (folder / "manifest.json").is_file()


def test_the_committed_markdown_is_rendered_from_the_committed_json():
    json_file = lora_fidelity.RESULTS / "lora-fidelity.json"
    record = json.loads(json_file.read_text())
    assert Path(json_file.with_suffix(".md")).read_text() == lora_fidelity.markdown(record)
    for model in record["results"]:
        file, pinned = lora_fidelity.adapter_file(model["model"])
        assert model["adapter"]["sha256"] == pinned
        assert model["adapter"]["file"] == str(file.relative_to(lora_fidelity.MODELS.parent))
