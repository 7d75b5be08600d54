"""quantization/ on tiny DiT, PixArt and SD UNet denoisers built from configs."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.generate import sample
from quantization import backend
from quantization.artifact import ArtifactError, load_quantized, sha256_of
from quantization.backend import LayerSpec
from quantization.blocks import find_blocks
from quantization.capture import replay
from quantization.plan import LayerPlan, plan_from_json, plan_to_json
from quantization.ptq import analyze, quantize_denoiser, uniform_plan
from quantization.recipes import RECIPES, get_recipe
from quantization.run import Options, quantize_source
from quantization.sensitivity import Measurer, quantize_layers, time_drift
from quantization.smoothing import outlier_ratio, smoothing_scales
from tests import tiny

TINY = {"dit": tiny.dit, "pixart": tiny.pixart, "unet": tiny.sd_unet}
FAST = {
    "steps": 3,
    "guidance": 2.0,
    "calibration_prompts": 4,
    "trajectory_prompts": 2,
    "check_images": 2,
}


def test_smoothing_scales_follow_the_smoothquant_formula():
    act, w = torch.tensor([4.0, 1.0, 16.0]), torch.tensor([1.0, 4.0, 1.0])
    s = smoothing_scales(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 4.0]))
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 20.0])) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(act, w, 1.0)


def test_smoothing_recovers_sqnr_lost_to_an_outlier_channel():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(256, 64)
    x[:, 3] *= 80.0  # one outlier channel ruins a per-tensor int8 scale
    ref = layer(x).detach()

    def w8a8(scale=None):
        model = torch.nn.Sequential(torch.nn.Linear(64, 32))
        model.load_state_dict(layer.state_dict())
        smoothing = None if scale is None else {"0": scale}
        quantize_layers(model, {"0": LayerSpec("qint8", "qint8")}, [_call(x)], smoothing)
        return backend.plain(model(x))

    from quality.metrics import sqnr_db

    plain_db = sqnr_db(ref, w8a8())
    s = smoothing_scales(x.abs().amax(0), layer[0].weight.abs().amax(0), 0.5)
    smooth_db = sqnr_db(ref, w8a8(s))
    assert smooth_db > plain_db + 6.0


def _call(x):
    from quantization.capture import Call

    return Call(0, (x,), {})


def test_time_drift_is_the_largest_range_change_in_octaves():
    assert time_drift({0: 1.0, 5: 4.0, 10: 0.5}) == pytest.approx(2.0)
    assert time_drift({0: 2.0, 1: 2.0}) == 0.0


@pytest.mark.parametrize("kind", list(TINY))
def test_blocks_cover_every_quantizable_layer_once(kind):
    model = TINY[kind]()
    blocks = find_blocks(model)
    layers = [layer for b in blocks for layer in b.layers]
    n_linear = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    assert len(layers) == len(set(layers)) == n_linear
    names = [b.name for b in blocks]
    expected = {
        "dit": "transformer_blocks.1",
        "pixart": "transformer_blocks.1",
        "unet": "mid_block",
    }[kind]
    assert expected in names


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-g128", "w4a8-g128", "fp8"])
def test_uniform_recipes_quantize_every_layer_and_stay_close_to_fp(kind, recipe):
    model, calls = TINY[kind](), tiny.calls(kind)
    result = quantize_denoiser(model, get_recipe(recipe), calls)
    assert backend.layer_specs(result.model) == {n: lp.spec for n, lp in result.plan.items()}
    m = Measurer(model, calls, calls)
    v = m.measure(result.model, layers=list(result.plan))
    assert 10.0 < v.sqnr_db < math.inf  # quantized, not broken
    assert v.weight_bytes < Measurer.layer_bytes(model, list(result.plan))


@pytest.mark.parametrize("kind", list(TINY))
def test_sqnr_driven_plan_beats_the_uniform_base_it_starts_from(kind):
    model, calls = TINY[kind](), tiny.calls(kind)
    measurer = Measurer(model, calls[:1], calls)
    result = analyze(measurer, get_recipe("w4a8-sqnr"), target_sqnr_db=60.0, budget_ratio=1.5)
    a = result.analysis
    assert set(result.plan) <= {layer for b in find_blocks(model) for layer in b.layers}
    assert a["measured"]["plan_sqnr_db"] > a["measured"]["uniform_base_sqnr_db"]
    g = a["global"]
    # the budget is on the whole denoiser: quantized layers plus what stays float
    assert g["plan_denoiser_bytes"] == g["plan_layer_bytes"] + g["fixed_bytes"]
    assert g["plan_denoiser_bytes"] <= g["budget_bytes"] == int(1.5 * g["base_denoiser_bytes"])
    assert g["fixed_bytes"] == backend.state_dict_bytes(model.state_dict()) - sum(
        p.numel() * p.element_size()
        for layer in (n for b in find_blocks(model) for n in b.layers)
        for p in model.get_submodule(layer).parameters(recurse=False)
    )
    # the first promotion goes to a block whose base-level SQNR is among the lowest
    relative = {b: r["w4a8"]["sqnr_db"] for b, r in a["relative_sqnr"].items()}
    first = a["global"]["promotions"][0]["block"]
    assert relative[first] <= sorted(relative.values())[len(relative) // 2]
    assert list(a["accumulated_sqnr_db"]) == a["blocks"]


def test_a_byte_budget_caps_the_whole_denoiser_and_one_below_the_base_is_refused():
    model, calls = tiny.dit(), tiny.calls("dit")
    measurer = Measurer(model, calls[:1], calls)
    recipe = get_recipe("w4a8-sqnr")
    free = analyze(measurer, recipe, target_sqnr_db=80.0, budget_ratio=None, detail=False)
    base = free.analysis["global"]["base_denoiser_bytes"]
    assert free.analysis["global"]["plan_denoiser_bytes"] > base  # unbounded: it promotes
    budget = base + (free.analysis["global"]["plan_denoiser_bytes"] - base) // 2
    capped = analyze(measurer, recipe, target_sqnr_db=80.0, budget_bytes=budget, detail=False)
    g = capped.analysis["global"]
    assert g["budget_bytes"] == budget and g["budget_ratio"] is None
    assert base < g["plan_denoiser_bytes"] <= budget
    with pytest.raises(ValueError, match=r"below the \d+ bytes the base recipe"):
        analyze(measurer, recipe, budget_bytes=base - 1, detail=False)


def test_group_size_is_recorded_and_reapplied_at_load(tmp_path):
    pipe = tiny.dit_pipeline()
    blocks = find_blocks(pipe.transformer)
    plan = {
        n: LayerPlan("qint4", None, 32, lp.block)
        for n, lp in uniform_plan(blocks, get_recipe("w4a16-g128")).items()
    }
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan_to_json(plan)))
    quantize_source(_saved(pipe, tmp_path), Options(plan=plan_file, **FAST), tmp_path / "art")
    saved = plan_from_json(json.loads((tmp_path / "art" / "plan.json").read_text()))
    wide = [n for n in saved if pipe.transformer.get_submodule(n).weight[0].numel() > 32]
    assert wide and all(saved[n].group_size == 32 for n in wide)
    loaded = load_quantized(tmp_path / "art").transformer
    assert all(backend.layer_specs(loaded)[n].group_size == 32 for n in wide)


def _saved(pipe, tmp_path):
    from models.loader import save_pipeline

    src = tmp_path / "src"
    save_pipeline(pipe, src)
    return str(src)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The tiny DiT pipeline quantized by every recipe through the same path as the CLI."""
    root = tmp_path_factory.mktemp("artifacts")
    pipe = tiny.dit_pipeline()
    src = _saved(pipe, root)
    made = {}
    for name in RECIPES:
        out = root / name
        quantize_source(src, Options(recipe=name, **FAST), out)
        made[name] = out
    return src, made


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_runs_end_to_end_and_its_artifact_reproduces_it(artifacts, recipe):
    src, made = artifacts
    out = made[recipe]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == recipe
    assert all(f["sha256"] for f in manifest["files"].values())
    assert set(manifest["versions"]) >= {"torch", "diffusers", "optimum-quanto"}
    assert (out / "report.md").is_file() and (out / "sqnr_vs_t.png").is_file()
    assert not list((out / "transformer").glob("diffusion_pytorch_model*"))
    # the loaded pipeline gives what the in-memory quantized one gave at quantize time
    pipe = load_quantized(out)
    from models.loader import load_pipeline
    from quality.metrics import sqnr_db
    from quantization.calibration import TRAJECTORY_SEED, calibration_conditions

    fp = load_pipeline(src)
    conditions = calibration_conditions(fp, FAST["check_images"], seed=TRAJECTORY_SEED + 1)
    kw = {
        "seed": TRAJECTORY_SEED + 1,
        "num_inference_steps": FAST["steps"],
        "guidance_scale": FAST["guidance"],
    }
    q = sample(pipe, conditions, **kw)
    ref = sample(fp, conditions, **kw)
    assert round(sqnr_db(ref.latents, q.latents), 3) == manifest["measured"]["sqnr_latent_db"]


@pytest.mark.parametrize("recipe", ["w4a16-g128", "w8a8", "w4a8-sqnr", "smoothed"])
def test_loaded_artifact_matches_the_in_memory_model_bit_for_bit(tmp_path, recipe):
    from quantization.artifact import save_artifact

    pipe = tiny.dit_pipeline()
    calls = tiny.calls("dit")
    if recipe == "smoothed":  # every layer smoothed: the scales must travel with the weights
        uniform = uniform_plan(find_blocks(pipe.transformer), get_recipe("w4a8-g128"))
        plan = {n: replace(lp, smoothing_alpha=0.5) for n, lp in uniform.items()}
        result = quantize_denoiser(pipe.transformer, get_recipe("w4a8-g128"), calls[:1], plan=plan)
        smooth = result.model.get_submodule("transformer_blocks.0.ff.net.2").smooth_scale
        assert not torch.equal(smooth, torch.ones_like(smooth))
    elif get_recipe(recipe).mixed_precision:
        r = get_recipe(recipe)
        result = analyze(Measurer(pipe.transformer, calls[:1], calls), r, target_sqnr_db=60.0)
    else:
        result = quantize_denoiser(pipe.transformer, get_recipe(recipe), calls[:1])
    save_artifact(
        tmp_path, pipe, result.model, result.plan, {"source": "tiny", "recipe": {"name": recipe}}
    )
    loaded = load_quantized(tmp_path).transformer
    for x, y in zip(replay(result.model, calls), replay(loaded, calls), strict=True):
        assert torch.equal(x, y)


def test_a_tampered_weight_file_is_refused(artifacts, tmp_path):
    import shutil

    _, made = artifacts
    out = tmp_path / "copy"
    shutil.copytree(made["w8a8"], out)
    f = out / "transformer" / "quantized.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_quantized(out)


def test_a_state_dict_with_a_missing_key_is_refused_even_with_a_matching_hash(artifacts, tmp_path):
    import shutil

    _, made = artifacts
    out = tmp_path / "copy"
    shutil.copytree(made["w4a16-g128"], out)
    f = out / "transformer" / "quantized.safetensors"
    state = load_file(f)
    dropped = next(k for k in state if k.endswith("weight._data._data"))  # packed int4
    del state[dropped]
    save_file(state, f)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["transformer/quantized.safetensors"]["sha256"] = sha256_of(f)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="1 missing"):
        load_quantized(out)


def test_stock_from_pretrained_does_not_silently_load_an_artifact(artifacts):
    from diffusers import DiffusionPipeline

    _, made = artifacts
    with pytest.raises(OSError):
        DiffusionPipeline.from_pretrained(made["w8a8"], local_files_only=True)


def test_plan_files_are_validated():
    with pytest.raises(ValueError, match="weights qtype"):
        plan_from_json({"a": {"weights": "qint3"}})
    with pytest.raises(ValueError, match="unknown fields"):
        plan_from_json({"a": {"weights": "qint8", "bits": 3}})
    with pytest.raises(ValueError, match="group_size applies"):
        plan_from_json({"a": {"weights": "qint8", "group_size": 64}})
    plan = plan_from_json({"a": {"weights": "qint4", "activations": "none", "group_size": 64}})
    assert plan["a"].spec == LayerSpec("qint4", None, 64)


@pytest.mark.parametrize("kind", list(TINY))
def test_block_scope_measures_each_block_alone_and_still_plans(kind):
    model, calls = TINY[kind](), tiny.calls(kind)
    measurer = Measurer(model, calls[:1], calls)
    block = find_blocks(model)[-1]
    spec = get_recipe("w4a8-g128").base_spec()
    inside = measurer.relative(block.name, {n: spec for n in block.layers})
    alone = measurer.relative_alone(block.name, {n: spec for n in block.layers})
    # the same quantized block: alone, on the inputs it saw in the FP model, it gives the same
    # block-output SQNR as inside the model (its inputs are FP there too)
    assert math.isfinite(alone.sqnr_db)
    assert alone.sqnr_db == pytest.approx(inside.local_sqnr_db, abs=1e-3)
    result = analyze(
        measurer, get_recipe("w4a8-sqnr"), target_sqnr_db=60.0, detail=False, scope="block"
    )
    assert result.analysis["scope"] == "block"
    assert (
        result.analysis["measured"]["plan_sqnr_db"]
        > result.analysis["measured"]["uniform_base_sqnr_db"]
    )
