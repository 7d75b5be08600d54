"""bench.lora_switch --arch sd15, its every eager stage run on a tiny UNet in place of SD 1.5's
(the builder it takes from bench.full_size swapped): adapter files read and checked against a
meta skeleton, branches wrapping float and x86 int8 layers, calls that match the plain one."""

import json

import pytest

from bench import lora_switch
from tests import tiny


def test_sd15_arch_runs_its_stages_on_the_unet_its_builder_gives(tmp_path, monkeypatch):
    built = []

    def builder(dtype, device, layers):
        built.append(layers)
        return tiny.sd_unet()

    monkeypatch.setattr(lora_switch, "sd15_unet", builder)
    out = tmp_path / "sd15.json"
    args = ["--arch", "sd15", "--layers", "1", "--rounds", "1", "--switches", "1", "--threads", "1"]
    lora_switch.main([*args, "--skip", "compile", "--out", str(out)])
    assert built == [1]
    r = json.loads(out.read_text())
    assert r["arch"] == "sd15" and r["threads"] == 1 and r["complete"]
    names = lora_switch.layer_names(tiny.sd_unet(), "attention")
    start = r["worker_start"]
    assert start["adapter_layers"] == len(names) and start["adapter_rank"] == 16
    assert start["skeleton_on"] == "meta" and start["adapter_file_bytes"] > 0
    fp32, w8a8 = r["eager"]
    assert (fp32["variant"], w8a8["variant"]) == ("fp32", "w8a8-static@x86")
    assert fp32["wrapped_layer_types"] == ["Linear"]
    assert w8a8["wrapped_layer_types"] == ["Int8Linear"]
    for row in (fp32, w8a8):
        assert row["lora_layers"] == len(names) and row["max_rank"] == 32
        assert row["lora_buffer_bytes"] > 0
        # no adapter, gated or not: the plain call's output exactly; the adapter's: repeatable
        assert set(row["max_abs_diff_vs_reference"].values()) == {0.0}
        assert set(row["call_ms"]) == {"plain", "ungated_none", "gated_none", "adapter"}
    assert r["compiled"] == {"skipped": "--skip compile"}
    assert "| `lora.read` (one file, sha256 pinned) |" in out.with_suffix(".md").read_text()


def test_compiling_the_quantized_unet_needs_its_stages(capsys):
    for skip in ("quantized", "compile"):
        with pytest.raises(SystemExit) as refused:
            lora_switch.main(["--arch", "sd15", "--compile-variant", "quantized", "--skip", skip])
        assert refused.value.code == 2
        assert "--compile-variant quantized needs" in capsys.readouterr().err
