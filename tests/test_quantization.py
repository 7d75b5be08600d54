"""quantization/ on tiny DiT, PixArt and SD UNet denoisers built from configs, on both backends."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.generate import guided_prediction, sample
from quality.metrics import sqnr_db
from quantization import QuantizeOptions, backends, load_quantized, quantize
from quantization.activations import collect_stats, ranges_for
from quantization.analysis import check_levels, find_units, uniform_plan
from quantization.api import analyze_denoiser, quantize_denoiser
from quantization.artifact import ArtifactError, open_source, save_artifact, sha256_of
from quantization.blocks import find_blocks
from quantization.calibration import SEEDS, Conditions
from quantization.capture import Call, denoiser_output, replay
from quantization.measure import Measurer, time_drift
from quantization.plan import LayerPlan, plan_from_json, plan_to_json, predicted_sqnr_db
from quantization.recording import record_calls_replayed
from quantization.smoothing import outlier_ratio, smoothing_scales
from quantization.types import RECIPES, LayerSpec, get_recipe
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dit": tiny.dit, "pixart": tiny.pixart, "unet": tiny.sd_unet}
CLASSES = Conditions("classes", (0, 1, 2, 3, 4, 5, 6, 7), "--classes")
FAST = QuantizeOptions(
    num_inference_steps=3,
    guidance_scale=2.0,
    calibration_prompts=4,
    prompts=2,
    check_images=2,
    conditions=CLASSES,
)
# What each backend can do on a CPU, as (recipe, granularity) pairs
UNIFORM = {
    "quanto": [("w8a8-static", None), ("w4a16-g128", None), ("w4a8-g128", None), ("fp8", None)],
    "torchao": [
        ("w8a8-static", None),
        ("w8a8-static", "token"),
        ("w8a16", None),
        ("w4a16-g128", None),
        ("w4a8-g128", "token"),
    ],
    "x86": [
        ("w8a8-static", None),
        ("w8a8-static", "timestep"),
        ("w8a8-static", "token"),
        ("w8a16", None),
    ],
}


def _uniform(name: str, granularity: str | None):
    r = get_recipe(name).with_granularity(granularity)
    return replace(r, levels=())


def _quantize_layers(impl, model, specs, calls, smoothing=None):
    """What the method does for a copy: ranges from the FP inputs of ``calls``, then quantize."""
    stats = collect_stats(model, list(specs), calls) if calls else None
    impl.quantize_layers(model, specs, ranges_for(stats, specs, smoothing), smoothing)


def _recording(model, calls, layers_of=None):
    impl = layers_of or backends.get("quanto")
    blocks = find_blocks(model, impl.LAYERS)
    return record_calls_replayed(
        model,
        calls,
        blocks=[b.name for b in blocks],
        layers=[n for b in blocks for n in b.layers],
    )


def test_smoothing_scales_follow_the_smoothquant_formula():
    act, w = torch.tensor([4.0, 1.0, 16.0]), torch.tensor([1.0, 4.0, 1.0])
    s = smoothing_scales(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 4.0]))
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 20.0])) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(act, w, 1.0)


@pytest.mark.parametrize("backend", ["quanto", "torchao"])
def test_smoothing_recovers_sqnr_lost_to_an_outlier_channel(backend):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(256, 64)
    x[:, 3] *= 80.0  # one outlier channel ruins a per-tensor int8 scale
    ref = layer(x).detach()
    impl = backends.get(backend)

    def w8a8(scale=None):
        model = torch.nn.Sequential(torch.nn.Linear(64, 32))
        model.load_state_dict(layer.state_dict())
        smoothing = None if scale is None else {"0": scale}
        _quantize_layers(
            impl, model, {"0": LayerSpec("int8", "int8")}, [Call(0, (x,), {})], smoothing
        )
        return impl.plain(model(x))

    plain_db = sqnr_db(ref, w8a8())
    s = smoothing_scales(x.abs().amax(0), layer[0].weight.abs().amax(0), 0.5)
    smooth_db = sqnr_db(ref, w8a8(s))
    assert smooth_db > plain_db + 6.0


def test_per_token_activations_keep_what_one_static_scale_loses():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(256, 64) * torch.logspace(-2, 1, 256).unsqueeze(1)  # tokens 1000x apart
    ref = layer(x).detach()
    impl = backends.get("torchao")
    out = {}
    for granularity in ("tensor", "token"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 32))
        model.load_state_dict(layer.state_dict())
        spec = LayerSpec("int8", "int8", None, granularity)
        _quantize_layers(impl, model, {"0": spec}, [Call(0, (x,), {})])
        out[granularity] = sqnr_db(ref, model(x))
    assert out["token"] > out["tensor"] + 10.0


class _Drifting(torch.nn.Module):
    """One layer whose input range grows 100x along t, as a denoiser's layers' ranges drift."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 16)

    def forward(self, x, timestep):
        return self.proj(x * (1.0 + timestep / 10.0))


def test_scales_per_timestep_range_follow_the_drift_and_switch_with_t():
    torch.manual_seed(0)
    fp = _Drifting()
    calls = [
        Call(i, (torch.randn(64, 32), torch.tensor(t)), {})
        for i, t in enumerate(range(990, -1, -110))
    ]
    ref = [y.detach() for y in replay(fp, calls)]
    impl = backends.get("quanto")
    db = {}
    for granularity in ("tensor", "timestep"):
        model = _Drifting()
        model.load_state_dict(fp.state_dict())
        spec = {"proj": LayerSpec("int8", "int8", None, granularity)}
        _quantize_layers(impl, model, spec, calls)
        db[granularity] = min(
            sqnr_db(r, impl.plain(y)) for r, y in zip(ref, replay(model, calls), strict=True)
        )
        assert impl.layer_specs(model)["proj"].granularity == granularity
    assert db["timestep"] > db["tensor"] + 10.0  # the worst step is far better off
    scales, edges = model.proj.range_scales, model.proj.range_edges
    assert scales.shape == (4,) and edges.shape == (3,)
    assert bool((scales[1:] > scales[:-1]).all())  # larger t, larger inputs, larger scale
    for t, i in ((0, 0), (400, 1), (990, 3)):
        model(torch.randn(2, 32), torch.tensor(t))
        assert float(model.proj.input_scale) == pytest.approx(float(scales[i]))
    with pytest.raises(ValueError, match="quanto"):
        backends.get("torchao").check(spec["proj"])


@pytest.mark.parametrize("kind", ["dit", "text"])
def test_guided_prediction_is_what_the_sampler_steps_with(kind):
    # DiT batches [cond, uncond] and has learned-variance channels; SD batches [uncond, cond]
    if kind == "dit":
        pipe, conditions = tiny.dit_pipeline(), [1, 2]
    else:
        pipe, conditions = open_source(ROOT / "models" / "t2i-digits"), ["a red one", "a blue two"]
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    outputs, stepped = [], []
    handle = denoiser.register_forward_hook(
        lambda m, a, o: outputs.append(denoiser_output(o).clone())
    )
    step = pipe.scheduler.step

    def spy(model_output, *args, **kwargs):
        stepped.append(model_output[: len(conditions)].clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = spy
    try:
        sample(pipe, conditions, seed=0, num_inference_steps=3, guidance_scale=4.0)
    finally:
        handle.remove()
    guide = guided_prediction(pipe, 4.0)
    assert len(outputs) == len(stepped) == 3
    for out, used in zip(outputs, stepped, strict=True):
        assert torch.allclose(guide(out), used, atol=1e-6)
    assert guided_prediction(pipe, 1.0) is None


def test_a_long_condition_list_is_sampled_across_its_range_and_a_short_one_cycled():
    every = Conditions("classes", tuple(range(1000)), "--classes all")
    calib, measured = every.pick(None, 32, "calibration"), every.pick(None, 32, "trajectory")
    assert calib[:3] == [0, 31, 62] and calib[-1] == 968  # across all 1000, not 0-31
    assert measured[0] == 15 and not set(calib) & set(measured)
    short = Conditions("prompts", ("a", "b", "c"), "--prompts")
    assert short.pick(None, 4, "calibration") == ["a", "b", "c", "a"]
    assert short.pick(None, 4, "check") == ["b", "c", "a", "b"]


def test_time_drift_is_the_largest_range_change_in_octaves():
    assert time_drift({0: 1.0, 5: 4.0, 10: 0.5}) == pytest.approx(2.0)
    assert time_drift({0: 2.0, 1: 2.0}) == 0.0


@pytest.mark.parametrize("kind", list(TINY))
def test_blocks_and_modules_cover_every_quantizable_layer_once(kind):
    model = TINY[kind]()
    blocks = find_blocks(model)
    layers = [layer for b in blocks for layer in b.layers]
    n_layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    assert len(layers) == len(set(layers)) == n_layers
    expected = {
        "dit": "transformer_blocks.1",
        "pixart": "transformer_blocks.1",
        "unet": "mid_block",
    }
    assert expected[kind] in [b.name for b in blocks]
    modules = find_blocks(model, unit="module")
    assert sorted(n for m in modules for n in m.layers) == sorted(layers)
    assert len(modules) > len(blocks)
    linear = find_blocks(model, backends.get("torchao").LAYERS)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(len(b.layers) for b in linear) == n_linear
    if kind == "dit":
        names = {m.name for m in modules}
        assert {
            "transformer_blocks.0.attn1",
            "transformer_blocks.0.ff",
            "transformer_blocks.0.norm1",
        } <= names


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize(
    ("backend", "recipe", "granularity"),
    [(b, r, g) for b, pairs in UNIFORM.items() for r, g in pairs],
    ids=lambda v: str(v),
)
def test_uniform_recipes_quantize_every_layer_and_stay_close_to_fp(
    kind, backend, recipe, granularity
):
    model, calls = TINY[kind](), tiny.calls(kind)
    r = _uniform(recipe, granularity)
    result = quantize_denoiser(model, r, calls, backend=backend)
    impl = backends.get(backend)
    assert impl.layer_specs(result.model) == {n: lp.spec for n, lp in result.plan.items()}
    assert set(result.plan) == {n for b in find_blocks(model, impl.LAYERS) for n in b.layers}
    m = Measurer(model, _recording(model, calls, impl), impl)
    v = m.replayed(result.model)
    assert 10.0 < v.sqnr_db < math.inf  # quantized, not broken
    fp_bytes = sum(
        p.numel() * p.element_size()
        for n in result.plan
        for p in model.get_submodule(n).parameters(recurse=False)
    )
    assert v.weight_bytes < fp_bytes
    assert not any(impl.is_quantized(x) for x in model.modules())  # the FP model is untouched


def test_torchao_refuses_what_it_cannot_do_with_the_flag_that_can():
    model = tiny.sd_unet()
    conv = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    impl = backends.get("torchao")
    with pytest.raises(ValueError, match=r"Linear layers only.*quanto"):
        impl.quantize_layers(model, {conv: LayerSpec("int8")}, {})
    with pytest.raises(ValueError, match=r"static int8.*quanto"):
        impl.check(LayerSpec("int4", "int8", 32, "tensor"))
    with pytest.raises(ValueError, match="CUDA"):
        impl.check(LayerSpec("fp8", "fp8", None, "token"))
    with pytest.raises(ValueError, match="torchao"):
        backends.get("quanto").check(LayerSpec("int8", "int8", None, "token"))


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize(("backend", "recipe"), [("quanto", "w4a8-sqnr"), ("torchao", "w8a8")])
def test_sqnr_driven_plan_beats_the_uniform_base_it_starts_from(kind, backend, recipe):
    model, calls = TINY[kind](), tiny.calls(kind)
    r = get_recipe(recipe)
    done = analyze_denoiser(model, r, calls[:1], calls, target_sqnr_db=60.0, budget_ratio=1.5)
    impl = backends.get(backend)
    units = find_units(model, impl.LAYERS, "module")
    assert set(done.plan) <= {layer for u in units for layer in u.layers}
    measurer = Measurer(model, _recording(model, calls, impl), impl)
    base = quantize_denoiser(model, _uniform(recipe, None), calls[:1], backend=backend).model
    assert measurer.replayed(done.model).sqnr_db > measurer.replayed(base).sqnr_db
    table = done.table
    # the budget is on the whole denoiser: quantized layers plus what stays float
    base_bytes = table.base_layer_bytes() + table.fixed_bytes
    assert done.choice.weight_bytes + table.fixed_bytes <= int(1.5 * base_bytes)
    assert table.fixed_bytes == backends.tensor_bytes(model.state_dict()) - sum(
        p.numel() * p.element_size()
        for layer in (n for u in units for n in u.layers)
        for p in model.get_submodule(layer).parameters(recurse=False)
    )
    # the first promotion goes to a unit whose base-level SQNR is among the lowest
    level = r.levels[0]
    relative = {u.name: table.entries[(u.name, level)].sqnr_db for u in units}
    first = done.choice.promotions[0].block
    assert relative[first] <= sorted(relative.values())[len(relative) // 2]
    assert not any(impl.is_quantized(x) for x in model.modules())  # the FP model is untouched


def test_a_byte_budget_caps_the_whole_denoiser_and_one_below_the_base_is_refused():
    model, calls = tiny.dit(), tiny.calls("dit")
    free = analyze_denoiser(
        model, "w4a8-sqnr", calls[:1], calls, target_sqnr_db=80.0, budget_ratio=10
    )
    base = free.table.base_layer_bytes() + free.table.fixed_bytes
    spent = free.choice.weight_bytes + free.table.fixed_bytes
    assert spent > base  # unbounded: it promotes
    budget = base + (spent - base) // 2
    capped = analyze_denoiser(
        model, "w4a8-sqnr", calls[:1], calls, target_sqnr_db=80.0, budget_bytes=budget
    )
    assert base < capped.choice.weight_bytes + capped.table.fixed_bytes <= budget
    with pytest.raises(ValueError, match=r"below the \d+ bytes the base recipe"):
        analyze_denoiser(model, "w4a8-sqnr", calls[:1], calls, budget_bytes=base - 1)


def test_replayed_checks_measure_the_base_then_each_plan_and_fit_the_offset():
    """Without a sampler, checks replay plans on the calls: the base first (its measurement
    corrects the block-scope predictions before anything is promoted), then each plan."""
    model, calls = tiny.dit(), tiny.calls("dit")
    target = 45.0
    # priced by bytes: on this tiny model float is faster than int8 everywhere, and a
    # latency-priced plan would spend the whole budget on float once the target is met
    recipe = replace(get_recipe("w8a8-static-sqnr"), latency_cost=False)
    done = analyze_denoiser(
        model, recipe, calls[:1], calls, scope="block", target_sqnr_db=target,
        budget_ratio=10, checks=3,
    )  # fmt: skip
    checks = done.table.checks
    assert 2 <= len(checks) <= 4 and all(c.measured_db is not None for c in checks)
    assert set(checks[0].levels.values()) == {"w8a8"}  # the base, unpromoted
    assert checks[-1].levels == done.choice.levels
    x86 = backends.get("x86")
    replayed = Measurer(model, _recording(model, calls, x86), x86).replayed(done.model).sqnr_db
    assert replayed == pytest.approx(checks[-1].measured_db, abs=0.01)
    # the table now predicts the last plan as measured
    assert predicted_sqnr_db(
        done.table.options(),
        {u: [o.level for o in opts].index(done.choice.levels[u])
         for u, opts in done.table.options().items()},
    ) == pytest.approx(checks[-1].measured_db, abs=0.5)  # fmt: skip
    if checks[-1].measured_db < target:
        assert len(checks) == 4 or checks[-1].levels == checks[-2].levels


@pytest.mark.parametrize("kind", list(TINY))
def test_a_unit_measured_from_the_recording_is_measured_exactly(kind):
    """Scope denoiser (the blocks before the unit replayed from the recording) gives what a
    full run of the denoiser with only that unit quantized gives; scope block, what that
    block's output is in the full run."""
    model, calls = TINY[kind](), tiny.calls(kind)
    impl = backends.get("quanto")
    measurer = Measurer(
        model,
        _recording(model, calls, impl),
        impl,
        calibration=collect_stats(
            model, [n for b in find_blocks(model) for n in b.layers], calls[:1]
        ),
    )
    units = find_units(model, impl.LAYERS, "module")
    unit = units[len(units) // 2]
    specs = {n: LayerSpec("int4", "int8", 32) for n in unit.layers}
    at_denoiser = measurer.unit(unit, unit.block, specs, scope="denoiser")
    at_block = measurer.unit(unit, unit.block, specs, scope="block")
    fp_block = [o for o in _outputs(model, unit.block, calls)]
    with measurer.swapped([unit.name], specs) as swapped:
        full = [denoiser_output(swapped(*c.args, **c.kwargs)) for c in calls]
        q_block = _outputs(swapped, unit.block, calls)
    fp = [denoiser_output(model(*c.args, **c.kwargs)) for c in calls]
    assert at_denoiser.sqnr_db == pytest.approx(
        sqnr_db(torch.cat([f.flatten() for f in fp]), torch.cat([f.flatten() for f in full])),
        abs=1e-4,
    )
    assert at_block.sqnr_db == pytest.approx(
        sqnr_db(torch.cat(fp_block), torch.cat(q_block)), abs=1e-4
    )
    assert not any(impl.is_quantized(x) for x in model.modules())


def _outputs(model, block, calls):
    out = []

    def keep(module, args, output):
        first = output if isinstance(output, torch.Tensor) else output[0]
        out.append(first.detach().flatten().clone())

    handle = model.get_submodule(block).register_forward_hook(keep)
    with torch.no_grad():
        for c in calls:
            model(*c.args, **c.kwargs)
    handle.remove()
    return out


def test_the_trajectory_is_recorded_once_and_the_plan_checked_end_to_end():
    from pipelines.generate import final_latents

    pipe = tiny.dit_pipeline()
    options = replace(FAST, target_sqnr_db=80.0, checks=2, refine=1)
    result = quantize(pipe, "w8a8", options=options, source="tiny")
    report = result.analysis
    assert report is not None and result.backend == "torchao"
    assert report.unit == "module" and report.scope in ("denoiser", "block")
    assert 1 <= len(report.checks) <= 2 and report.checks[0]["measured_db"] is not None
    # the check's latents are the pipeline's: FP and quantized sampled from the same seeds
    on = CLASSES.pick(pipe, 2, "trajectory")
    seeds = [SEEDS["trajectory"] + i for i in range(2)]
    fp = final_latents(pipe, on, seeds, num_inference_steps=3, guidance_scale=2.0)
    q = final_latents(result.pipeline, on, seeds, num_inference_steps=3, guidance_scale=2.0)
    assert round(sqnr_db(fp, q), 3) == result.measured["sqnr_latent_db"]
    # FP's trajectory was sampled once, every unit measured from it
    calls = result.work["calls"]
    assert calls["trajectory"]["denoiser"] == 3
    assert calls["sensitivity"].get("denoiser", 0) + calls["sensitivity"].get("blocks", 0) > 0
    # the result's pipeline has the quantized denoiser; the FP pipeline keeps its own
    assert result.pipeline.transformer is result.denoiser is not pipe.transformer
    assert result.pipeline.vae is pipe.vae
    assert not any(backends.get("torchao").is_quantized(m) for m in pipe.transformer.modules())
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks


def test_guided_measuring_compares_the_guided_noise_and_lowers_sqnr():
    pipe = tiny.dit_pipeline()
    runs = {}
    for guided in (False, True):
        options = replace(FAST, scope="denoiser", guided=guided, checks=1)
        runs[guided] = quantize(pipe, "w4a8-sqnr", options=options, source="tiny").analysis
    assert runs[True].guided and not runs[False].guided
    # the same units, measured on what guidance makes of their outputs: noisier
    level = runs[True].levels[0]

    def mean(report):
        values = [v[level]["sqnr_db"] for v in report.relative_sqnr.values()]
        return sum(values) / len(values)

    assert mean(runs[True]) < mean(runs[False])


def test_group_size_is_recorded_and_reapplied_at_load(tmp_path):
    pipe = tiny.dit_pipeline()
    units = find_units(pipe.transformer, backends.get("quanto").LAYERS, "block")
    plan = {
        n: LayerPlan("int4", None, 32, None, lp.block)
        for n, lp in uniform_plan(units, get_recipe("w4a16-g128")).items()
    }
    result = quantize(pipe, plan, options=FAST, source="tiny")
    assert result.backend == "quanto"
    result.save(tmp_path / "art")
    saved = plan_from_json(json.loads((tmp_path / "art" / "plan.json").read_text()))
    wide = [n for n in saved if pipe.transformer.get_submodule(n).weight[0].numel() > 32]
    assert wide and all(saved[n].group_size == 32 for n in wide)
    loaded = load_quantized(tmp_path / "art").transformer
    specs = backends.get("quanto").layer_specs(loaded)
    assert all(specs[n].group_size == 32 for n in wide)


# every recipe by its default backend, and torchao's static int8 beside quanto's
MADE = [(name, None) for name in RECIPES] + [("w8a8-static", "torchao")]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The tiny DiT pipeline quantized by every recipe through quantize() and Result.save."""
    root = tmp_path_factory.mktemp("artifacts")
    pipe = tiny.dit_pipeline()
    made = {}
    for name, backend in MADE:
        result = quantize(pipe, name, options=replace(FAST, backend=backend), source="tiny")
        out = root / f"{name}-{result.backend}"
        result.save(out)
        made[(name, backend)] = out
    return pipe, made


@pytest.mark.parametrize(("recipe", "backend"), MADE, ids=lambda v: str(v))
def test_every_recipe_runs_end_to_end_and_its_artifact_reproduces_it(artifacts, recipe, backend):
    fp, made = artifacts
    out = made[(recipe, backend)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == recipe
    assert manifest["backend"] == (backend or get_recipe(recipe).backend)
    assert all(f["sha256"] for f in manifest["files"].values())
    library = {"quanto": "optimum-quanto", "torchao": "torchao", "x86": "torch"}[
        manifest["backend"]
    ]
    assert set(manifest["versions"]) >= {"torch", "diffusers", library}
    assert manifest["calibration"]["conditions"]["origin"] == "--classes"
    assert (out / "report.md").is_file()
    # a planned recipe recorded FP's trajectory: its plan's SQNR against t is plotted
    assert (out / "sqnr_vs_t.png").is_file() == get_recipe(recipe).mixed_precision
    assert not list((out / "transformer").glob("diffusion_pytorch_model*"))
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    # the loaded pipeline gives what the in-memory quantized one gave at quantize time
    pipe = load_quantized(out)
    measured = manifest["measured"]
    use = measured["check_conditions"]  # planned recipes check on the measuring conditions
    assert use == ("trajectory" if get_recipe(recipe).mixed_precision else "check")
    conditions = CLASSES.pick(fp, measured["check_images"], use)
    kw = {"seed": SEEDS[use], "num_inference_steps": 3, "guidance_scale": 2.0}
    q, ref = sample(pipe, conditions, **kw), sample(fp, conditions, **kw)
    assert round(sqnr_db(ref.latents, q.latents), 3) == measured["sqnr_latent_db"]


@pytest.mark.parametrize(
    ("backend", "recipe"),
    [
        ("quanto", "w4a16-g128"),
        ("quanto", "w8a8-static"),
        ("quanto", "w4a8-sqnr"),
        ("quanto", "smoothed"),
        ("quanto", "timestep"),
        ("torchao", "w8a8"),
        ("torchao", "w8a8-static"),
        ("torchao", "w4a16-g128"),
        ("torchao", "smoothed"),
        ("x86", "w8a8-static"),
        ("x86", "smoothed"),
        ("x86", "timestep"),
    ],
)
def test_loaded_artifact_matches_the_in_memory_model_bit_for_bit(tmp_path, backend, recipe):
    pipe = tiny.dit_pipeline()
    calls = tiny.calls("dit")
    base = get_recipe("w4a8-g128" if backend == "quanto" else "w8a8-static")
    if recipe == "smoothed":  # every layer smoothed: the scales must travel with the weights
        impl = backends.get(backend)
        uniform = uniform_plan(find_units(pipe.transformer, impl.LAYERS, "block"), base)
        plan = {n: replace(lp, smoothing_alpha=0.5) for n, lp in uniform.items()}
        result = quantize_denoiser(pipe.transformer, plan, calls[:1], backend=backend)
        smooth = result.model.get_submodule("transformer_blocks.0.ff.net.2").smooth_scale
        assert not torch.equal(smooth, torch.ones_like(smooth))
    elif recipe == "timestep":  # scales per range of t: the ranges must travel too
        r = _uniform("w8a8-static", "timestep")
        result = quantize_denoiser(pipe.transformer, r, calls, backend=backend)
        assert result.plan["proj_out_2"].spec.granularity == "timestep"
    elif get_recipe(recipe).mixed_precision:
        result = analyze_denoiser(
            pipe.transformer, recipe, calls[:1], calls, backend=backend, target_sqnr_db=60.0
        )
    else:
        result = quantize_denoiser(pipe.transformer, get_recipe(recipe), calls[:1], backend=backend)
    manifest = {"source": "tiny", "recipe": {"name": recipe}}
    save_artifact(tmp_path, pipe, result.model, result.plan, manifest, backend=backend)
    loaded = load_quantized(tmp_path).transformer
    for x, y in zip(replay(result.model, calls), replay(loaded, calls), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(("recipe", "backend"), [("w8a8", None), ("w4a8-sqnr", None)])
def test_a_flipped_byte_in_any_weight_file_is_refused(artifacts, tmp_path, recipe, backend):
    _, made = artifacts
    source = made[(recipe, backend)]
    files = sorted(p.relative_to(source) for p in source.rglob("*.safetensors"))
    assert len(files) >= 2  # the quantized denoiser and the VAE at least
    for rel in files:
        out = tmp_path / str(rel).replace("/", "_")
        shutil.copytree(source, out)
        f = out / rel
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        f.write_bytes(bytes(raw))
        with pytest.raises(ArtifactError, match="sha256"):
            load_quantized(out)


@pytest.mark.parametrize(
    ("recipe", "backend", "suffix"),
    [("w4a16-g128", None, "weight._data._data"), ("w8a8", None, "_weight_qdata")],
)
def test_a_state_dict_with_a_missing_key_is_refused_even_with_a_matching_hash(
    artifacts, tmp_path, recipe, backend, suffix
):
    _, made = artifacts
    out = tmp_path / "copy"
    shutil.copytree(made[(recipe, backend)], out)
    f = out / "transformer" / "quantized.safetensors"
    from safetensors import safe_open

    with safe_open(f, framework="pt") as opened:
        metadata = opened.metadata()
    state = load_file(f)
    dropped = next(k for k in state if k.endswith(suffix))
    del state[dropped]
    save_file(state, f, metadata=metadata)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["transformer/quantized.safetensors"]["sha256"] = sha256_of(f)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"missing|no state entry|do not match"):
        load_quantized(out)


def test_stock_from_pretrained_does_not_silently_load_an_artifact(artifacts):
    from diffusers import DiffusionPipeline

    _, made = artifacts
    with pytest.raises(OSError):
        DiffusionPipeline.from_pretrained(made[("w8a8", None)], local_files_only=True)


def test_plan_files_are_validated():
    with pytest.raises(ValueError, match="weights must be one of"):
        plan_from_json({"a": {"weights": "qint8"}})
    with pytest.raises(ValueError, match="unknown fields"):
        plan_from_json({"a": {"weights": "int8", "bits": 3}})
    with pytest.raises(ValueError, match="group_size applies"):
        plan_from_json({"a": {"weights": "int8", "group_size": 64}})
    with pytest.raises(ValueError, match="granularity must be"):
        plan_from_json({"a": {"weights": "int8", "activations": "int8", "granularity": "row"}})
    plan = plan_from_json({"a": {"weights": "int4", "activations": "none", "group_size": 64}})
    assert plan["a"].spec == LayerSpec("int4", None, 64)
    assert plan_from_json(plan_to_json(plan)) == plan


def test_a_recipe_level_the_backend_cannot_build_is_refused_before_any_measurement():
    model, calls = tiny.dit(), tiny.calls("dit")
    with pytest.raises(ValueError, match=r"w8a8-static-sqnr on the quanto backend, level w8a8t"):
        analyze_denoiser(model, "w8a8-static-sqnr", calls[:1], calls, backend="quanto")
    with pytest.raises(ValueError, match=r"w8a8-static on the x86 backend, its base.*cuda"):
        check_levels(backends.get("x86"), get_recipe("w8a8-static"), "cuda")
    with pytest.raises(ValueError, match=r"level bf16: bf16 layers are the x86 backend's"):
        check_levels(backends.get("torchao"), get_recipe("w8a8-static-sqnr"), "cpu")
