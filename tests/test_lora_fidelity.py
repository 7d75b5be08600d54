"""bench.lora_fidelity: it measures the registry's variants; its Markdown is its JSON."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import lora_fidelity
from pipelines import lora
from quality.metrics import psnr_db, sqnr_db


def test_the_variants_are_the_registrys_in_its_order():
    for model in ("dit-digits", "t2i-digits"):
        found = lora_fidelity.variants(model)
        assert [v for v, _, _ in found] == ["fp32", "w8a8", "w4a8-sqnr"]
        assert found[0][2] == "fp32" and found[0][1].name == model
        for _, folder, dtype in found[1:]:
            assert dtype is None and (folder / "manifest.json").is_file()


def test_the_control_noise_has_the_sqnr_asked_on_every_base_weight_and_spares_the_adapter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16 * 30 * 30, 64)
    )
    lora.attach(model, max_rank=4, targets=["0", "2"])
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    assert lora_fidelity.add_weight_noise(model, 20.0) == 2
    after = model.state_dict()
    for key in ("0.base.weight", "2.base.weight"):
        assert sqnr_db(before[key], after[key]) == pytest.approx(20.0, abs=0.3)
    for key in ("0.base.bias", "2.base.bias"):
        assert torch.equal(before[key], after[key])
    for key, value in model.named_buffers():
        assert torch.equal(buffers[key], value), key
    one, two = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    two.load_state_dict(one.state_dict())
    lora_fidelity.add_weight_noise(one, 30.0)
    lora_fidelity.add_weight_noise(two, 30.0)
    assert torch.equal(one.weight, two.weight)  # seeded


def test_the_committed_markdown_is_rendered_from_the_committed_json():
    json_file = lora_fidelity.RESULTS / "lora-fidelity.json"
    record = json.loads(json_file.read_text())
    assert Path(json_file.with_suffix(".md")).read_text() == lora_fidelity.markdown(record)
    for model in record["results"]:
        file, pinned = lora_fidelity.adapter_file(model["model"])
        assert model["adapter"]["sha256"] == pinned
        assert model["adapter"]["file"] == str(file.relative_to(lora_fidelity.MODELS.parent))


@pytest.mark.parametrize("bad", ["abc", "nan", "inf", ""])
def test_a_control_is_bf16_or_a_finite_number_of_db(bad):
    assert lora_fidelity.control_kind("bf16") == "bf16"
    assert lora_fidelity.control_kind("26.5") == "26.5"
    with pytest.raises(argparse.ArgumentTypeError, match="bf16 or dB"):
        lora_fidelity.control_kind(bad)


def test_the_median_image_psnr_is_a_typical_images_where_one_outlier_sets_the_batchs():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(8, 4, 4, 3), dtype=np.uint8)
    got = ref.copy()
    got[:, 0, 0, 0] ^= 1  # every image a little off
    got[3] = 255 - ref[3]  # one image gone another way
    typical = psnr_db(ref[:1], got[:1])
    assert lora_fidelity.median_image_psnr(ref, got) == pytest.approx(typical)
    assert psnr_db(ref, got) < typical - 20
    per_set = lora_fidelity.median_image_psnr_per_set(ref, got, 2)
    assert per_set == [pytest.approx(typical, abs=1e-3)] * 2
    fields = lora_fidelity.psnr_fields(ref, got, 2, "_with_lora")
    assert fields["psnr_median_per_image_vs_fp32_with_lora_db"] == pytest.approx(typical, abs=1e-3)
    first, second = fields["psnr_vs_fp32_with_lora_per_set_db"]
    assert second == pytest.approx(typical, abs=1e-3) and first < typical - 20
