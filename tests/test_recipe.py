"""The training recipe runs end to end for a few steps and writes loadable diffusers folders."""

import json

import numpy as np
import pytest

from models import train
from models.targets import evaluation_targets, generate
from pipelines.loader import load_pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    train.main(["digit-classifier", "--steps", "3", "--out", str(root / "classifier")])
    train.main(["vae-digits", "--steps", "3", "--out", str(root / "vae")])
    for name in ("dit-digits", "t2i-digits"):
        train.main([name, "--steps", "3", "--out", str(root / name), "--vae", str(root / "vae")])
    return root


def test_recipe_writes_safetensors_folders_with_their_records(trained):
    for name in ("classifier", "vae", "dit-digits", "t2i-digits"):
        recipe = json.loads((trained / name / "recipe.json").read_text())
        assert recipe["steps"] == 3 and recipe["wall_seconds"] > 0
    files = [p.name for p in trained.rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert (trained / "dit-digits" / "id2label.json").is_file()
    assert not (trained / "t2i-digits" / "_vocab").exists()


@pytest.mark.parametrize(("name", "colors"), [("dit-digits", False), ("t2i-digits", True)])
def test_recipe_output_loads_offline_and_generates_deterministically(trained, name, colors):
    pipe = load_pipeline(trained / name)
    pipe.set_progress_bar_config(disable=True)
    targets = evaluation_targets(2, with_colors=colors)
    first = generate(pipe, targets, seed=5, num_inference_steps=2, guidance_scale=2.0)
    again = generate(pipe, targets, seed=5, num_inference_steps=2, guidance_scale=2.0)
    assert first.shape == (2, 32, 32, 3)
    assert np.array_equal(first, again)


def test_vae_must_exist_before_a_diffusion_model_is_trained(tmp_path):
    with pytest.raises(SystemExit, match=r"models\.train vae-digits"):
        train.main(
            ["dit-digits", "--steps", "1", "--out", str(tmp_path), "--vae", str(tmp_path / "none")]
        )
