"""The italic LoRA recipe (python -m models.train lora-italic-*) writes an adapter file that
pipelines.lora reads and accepts for its base, and that reproduces the trained model."""

import json
from dataclasses import replace

import torch
from safetensors import safe_open

from models import train
from pipelines import lora
from pipelines.loader import load_pipeline


def test_a_short_italic_run_writes_an_adapter_pipelines_lora_reads_and_checks(tmp_path):
    train.main(["lora-italic-t2i", "--steps", "3", "--out", str(tmp_path), "--eval-images", "0"])
    path = tmp_path / "t2i-digits-italic.safetensors"
    record = json.loads((tmp_path / "t2i-digits-italic.json").read_text())
    adapter = lora.read(path, sha256=record["sha256"])
    unet = load_pipeline(train.MODELS_DIR / "t2i-digits").unet
    lora.check(adapter, unet)
    assert adapter.layout == "peft" and adapter.max_rank == record["rank"] == 8
    assert len(adapter.layers) == record["layers"]
    assert all(".transformer_blocks." in name for name in adapter.layers)
    assert all(layer.alpha == record["alpha"] for layer in adapter.layers.values())
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["rank"] == "8" and float(f.metadata()["alpha"]) == 8.0
    assert all(
        k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys
    )
    # three steps moved B off zero, and pipelines.lora gives what the trained model gave
    assert any(layer.up.abs().max() > 0 for layer in adapter.layers.values())
    assert record["applied_vs_trained_max_abs_diff"] <= 1e-4
    assert record["trained_vs_base_max_abs_diff"] > 0
    assert record["steps"] == 3 and record["effect"] is None


def test_all_trains_the_base_models_only():
    assert "all" not in train.LORA_RECIPES
    assert not set(train.LORA_RECIPES) & set(train.RECIPES)


def test_a_trainable_pair_computes_what_a_lora_layer_computes():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    pair = train.TrainableLoRA(base, rank=4, alpha=8.0, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pair.lora_B.normal_()
    x = torch.randn(5, 16)
    adapter = lora.Adapter(
        "t", "(memory)", "", "peft",
        {"layer": lora.LayerLoRA("layer", pair.lora_A.detach(), pair.lora_B.detach(), 8.0)},
    )  # fmt: skip
    holder = torch.nn.Module()
    holder.layer = base
    lora.attach(holder, 4, ["layer"])
    lora.set_adapters(holder, [(adapter, 1.0)])
    assert torch.allclose(holder.layer(x), pair(x), atol=1e-6)
    merged = base(x) + x @ (2.0 * pair.lora_B @ pair.lora_A).T.detach()
    assert torch.allclose(pair(x), merged, atol=1e-5)


def test_an_adapter_file_is_the_same_bytes_for_the_same_pairs(tmp_path):
    base = torch.nn.Linear(8, 6)
    pair = train.TrainableLoRA(base, rank=2, alpha=2.0, gen=torch.Generator().manual_seed(0))
    italic = replace(train.LORA_RECIPES["lora-italic-t2i"][1], rank=2, alpha=4.0)
    for name in ("a", "b"):
        train._save_adapter(tmp_path / f"{name}.safetensors", {"x.to_q": pair}, italic, "t")
    first, second = ((tmp_path / f"{n}.safetensors").read_bytes() for n in ("a", "b"))
    assert first == second
    adapter = lora.read(tmp_path / "a.safetensors")
    assert list(adapter.layers) == ["x.to_q"] and adapter.layers["x.to_q"].alpha == 4.0
