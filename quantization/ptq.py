"""The method end to end on one denoiser: calibrate, measure, plan, treat, quantize.

    result = analyze(Measurer(denoiser, calibration, trajectory, "quanto"), get_recipe("w4a8-sqnr"))
    result.model     # the quantized copy (the FP denoiser is left as it was)
    result.plan      # {layer: LayerPlan}
    result.analysis  # JSON-able: sensitivity, choices and the gain of each treatment

Uniform recipes need only the calibration calls (``quantize_denoiser``). The SQNR-driven
recipes also need a recorded FP trajectory to measure on (``analyze``; docs/quantization.md,
"The algorithm", steps 2-4). ``quantization.quantize`` runs either on a pipeline.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from quantization import backends
from quantization.blocks import Block, find_blocks
from quantization.capture import Call, layer_stats, timestep_of
from quantization.plan import BlockOption, LayerPlan, greedy_plan, specs_of
from quantization.sensitivity import TIME_DRIFT_OCTAVES, Measurer
from quantization.smoothing import smoothing_scales as scales_for
from quantization.smoothing import weight_channel_absmax
from quantization.types import LayerSpec, Recipe, level_spec

__all__ = [
    "FROM_RECIPE",
    "Result",
    "analyze",
    "fixed_bytes",
    "quantize_denoiser",
    "timesteps_of",
    "uniform_plan",
]

SCOPES = ("denoiser", "block", "end-to-end")  # where a block's relative SQNR is measured
WORST_BLOCKS = 2  # per-layer SQNR is measured inside this many least-SQNR blocks


@dataclass
class Result:
    model: nn.Module
    plan: dict[str, LayerPlan]
    analysis: dict = field(default_factory=dict)
    seconds: float = 0.0


def _as_applied(plan: dict[str, LayerPlan], model: nn.Module, backend) -> dict[str, LayerPlan]:
    """The plan with the group sizes the layers really got (a group wider than a row: per row)."""
    applied = backend.layer_specs(model)
    return {n: replace(lp, group_size=applied[n].group_size) for n, lp in plan.items()}


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isinf(x) or math.isnan(x) else round(x, 3)


def _fp_bytes(denoiser: nn.Module, layers: tuple[str, ...]) -> int:
    return sum(
        p.numel() * p.element_size()
        for n in layers
        for p in denoiser.get_submodule(n).parameters(recurse=False)
    )


def fixed_bytes(denoiser: nn.Module, layers: list[str]) -> int:
    """Bytes of the denoiser that stay float whatever the plan: everything but ``layers``
    (embedding tables, norms, positional buffers that are saved)."""
    total = backends.tensor_bytes({k: v for k, v in denoiser.state_dict().items() if v is not None})
    return total - _fp_bytes(denoiser, tuple(layers))


def uniform_plan(blocks: list[Block], recipe: Recipe) -> dict[str, LayerPlan]:
    """Every quantizable layer at the recipe's base spec."""
    spec = recipe.base_spec()
    return {
        layer: LayerPlan(
            spec.weights, spec.activations, spec.group_size, spec.granularity, block=b.name
        )
        for b in blocks
        for layer in b.layers
    }


def _plan_at_levels(
    blocks: list[Block],
    levels: dict[str, str],
    recipe: Recipe,
    time_sensitive: set[str],
    smoothing: dict[str, dict],
) -> dict[str, LayerPlan]:
    plan = {}
    for b in blocks:
        spec = level_spec(levels[b.name], recipe.group_size, recipe.granularity)
        if spec is None:
            continue
        for layer in b.layers:
            protect = layer in time_sensitive
            activations = None if protect else spec.activations
            alpha = (
                smoothing[layer]["alpha"]
                if layer in smoothing and activations is not None
                else None
            )
            plan[layer] = LayerPlan(
                spec.weights,
                activations,
                spec.group_size,
                spec.granularity,
                b.name,
                alpha,
                protect,
            )
    return plan


def _scales(plan: dict[str, LayerPlan], smoothing: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {n: smoothing[n]["scale"] for n, lp in plan.items() if lp.smoothing_alpha is not None}


def _block_specs(plan: dict[str, LayerPlan], block: Block) -> dict[str, LayerSpec]:
    return {n: plan[n].spec for n in block.layers if n in plan}


class _FromRecipe:
    def __repr__(self) -> str:
        return "FROM_RECIPE"


FROM_RECIPE = _FromRecipe()  # an argument of analyze() left to the recipe's own value


def analyze(
    measurer: Measurer,
    recipe: Recipe,
    *,
    target_sqnr_db: float | _FromRecipe | None = FROM_RECIPE,
    budget_ratio: float | _FromRecipe | None = FROM_RECIPE,
    budget_bytes: int | None = None,
    smoothing_on: bool | None = None,
    time_protection_on: bool | None = None,
    detail: bool = True,
    scope: str | None = None,
    progress=lambda message: None,
) -> Result:
    """Sensitivity analysis and the SQNR-driven plan for ``recipe``'s base spec.

    Args:
        target_sqnr_db: stop promoting once the predicted SQNR (at the denoiser output, or of
            the final latents for scope "end-to-end") reaches this.
        budget_ratio: never exceed this many times the bytes of the whole denoiser quantized
            by the base recipe (what the model weighs, float leftovers included).
        budget_bytes: never exceed this many bytes for the whole denoiser (overrides
            ``budget_ratio``); a budget below what the base recipe needs is an error.
        detail: also measure accumulated SQNR, per-layer SQNR in the worst blocks and the gain
            of each treatment (the plan itself needs none of them).
        scope: where relative SQNR is measured for the plan: "denoiser" (the block quantized
            inside the FP denoiser, SQNR at the denoiser output on the replayed trajectory:
            the paper's definition), "block" (the block run alone on its recorded inputs, SQNR
            at its output: a proxy about as many times cheaper as there are blocks, for
            full-size models on a CPU) or "end-to-end" (the pipeline sampled with the block
            quantized, SQNR of the final latents: the noise as the sampler compounds it).
        progress: called with a short message before each stage.
    Every argument left out takes the recipe's value (target, budget ratio, treatments,
    scope); ``None`` for the target or the ratio means none.
    """
    if target_sqnr_db is FROM_RECIPE:
        target_sqnr_db = recipe.target_sqnr_db
    if budget_ratio is FROM_RECIPE:
        budget_ratio = recipe.budget_ratio
    smoothing_on = recipe.smoothing if smoothing_on is None else smoothing_on
    if time_protection_on is None:
        time_protection_on = recipe.protect_time_sensitive
    scope = scope or recipe.scope
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    start = time.perf_counter()
    denoiser = measurer.denoiser
    blocks = find_blocks(denoiser, measurer.backend.LAYERS, recipe.unit)
    layers = [layer for b in blocks for layer in b.layers]
    if not recipe.mixed_precision:
        raise ValueError(f"recipe {recipe.name} has one precision level: nothing to analyze")
    levels = recipe.levels
    base_level = levels[0]

    progress("time sensitivity: activation ranges along the trajectory")
    drifts = measurer.time_drifts(layers)
    time_sensitive = (
        {n for n, d in drifts.items() if d >= TIME_DRIFT_OCTAVES} if time_protection_on else set()
    )

    base_levels = {b.name: base_level for b in blocks}
    smoothing: dict[str, dict] = {}
    if smoothing_on:
        progress("smoothing: alphas for layers with outlier input channels")
        untreated = _plan_at_levels(blocks, base_levels, recipe, time_sensitive, {})
        smoothing = measurer.choose_smoothing(list(untreated), specs_of(untreated))

    base_plan = _plan_at_levels(blocks, base_levels, recipe, time_sensitive, smoothing)
    scales = _scales(base_plan, smoothing)

    measured_levels = [lv for lv in levels if lv != "float"]
    progress(f"relative SQNR of {len(blocks)} blocks at {len(measured_levels)} levels")
    options: dict[str, list[BlockOption]] = {b.name: [] for b in blocks}
    relative: dict[str, dict] = {b.name: {} for b in blocks}
    fixed = fixed_bytes(denoiser, layers)
    budget, base_bytes = budget_bytes, 0
    for level in levels:  # the base level first for every block: the budget is checked on it
        for b in blocks:
            if level == "float":
                nbytes = _fp_bytes(denoiser, b.layers)
                options[b.name].append(BlockOption(level, math.inf, nbytes, nbytes))
                relative[b.name]["float"] = {"weight_bytes": nbytes}
                continue
            plan = _plan_at_levels(
                blocks, {**base_levels, b.name: level}, recipe, time_sensitive, smoothing
            )
            measure = {
                "denoiser": measurer.relative,
                "block": measurer.relative_alone,
                "end-to-end": measurer.relative_end_to_end,
            }[scope]
            v = measure(b.name, _block_specs(plan, b), _scales(plan, smoothing))
            float_mm = _fp_bytes(
                denoiser, tuple(n for n in b.layers if n in plan and plan[n].activations is None)
            )
            options[b.name].append(BlockOption(level, v.sqnr_db, v.weight_bytes, float_mm))
            relative[b.name][level] = {
                "sqnr_db": _finite(v.sqnr_db),
                "block_output_sqnr_db": _finite(v.local_sqnr_db),
                "weight_bytes": v.weight_bytes,
            }
        if level == base_level:
            base_bytes = sum(o[0].weight_bytes for o in options.values())
            if budget is None and budget_ratio is not None:
                budget = int((base_bytes + fixed) * budget_ratio)
            if budget is not None and budget < base_bytes + fixed:
                raise ValueError(
                    f"budget of {budget} bytes is below the {base_bytes + fixed} bytes the "
                    f"base recipe already makes the denoiser ({fixed} of them stay float "
                    "whatever the plan)"
                )

    choice = greedy_plan(
        options,
        target_sqnr_db=target_sqnr_db,
        budget_bytes=None if budget is None else budget - fixed,
    )
    plan = _plan_at_levels(blocks, choice.levels, recipe, time_sensitive, smoothing)

    worst = sorted(blocks, key=lambda b: options[b.name][0].sqnr_db)[:WORST_BLOCKS]
    accumulated, per_layer = {}, {}
    if detail:
        progress("accumulated SQNR of the base recipe, block after block")
        accumulated = measurer.accumulated(
            [b.name for b in blocks], {b.name: _block_specs(base_plan, b) for b in blocks}, scales
        )
        progress(f"per-layer SQNR inside the worst blocks {[b.name for b in worst]}")
    for b in worst if detail else []:
        for layer in b.layers:
            v = measurer.layer_alone(
                layer, base_plan[layer].spec, _scales({layer: base_plan[layer]}, smoothing)
            )
            per_layer[layer] = {
                "layer_output_sqnr_db": _finite(v.local_sqnr_db),
                "denoiser_sqnr_db": _finite(v.sqnr_db),
            }

    progress("the plan, and the gain of each treatment")
    model, final = measurer.full(specs_of(plan), _scales(plan, smoothing))
    untreated_plan = _plan_at_levels(blocks, base_levels, recipe, set(), {})
    _, untreated = measurer.full(specs_of(untreated_plan))
    base_variant = None
    if detail:
        _, base_variant = measurer.full(specs_of(base_plan), scales)
    gains = {
        "uniform_base_sqnr_db": _finite(untreated.sqnr_db),
        "with_time_protection_sqnr_db": None,
        "with_smoothing_sqnr_db": None,
        "with_both_sqnr_db": None if base_variant is None else _finite(base_variant.sqnr_db),
    }
    if time_sensitive and detail:
        _, v = measurer.full(
            specs_of(_plan_at_levels(blocks, base_levels, recipe, time_sensitive, {}))
        )
        gains["with_time_protection_sqnr_db"] = _finite(v.sqnr_db)
    if smoothing and detail:
        only_smooth = _plan_at_levels(blocks, base_levels, recipe, set(), smoothing)
        _, v = measurer.full(specs_of(only_smooth), _scales(only_smooth, smoothing))
        gains["with_smoothing_sqnr_db"] = _finite(v.sqnr_db)

    analysis = {
        "recipe": recipe.name,
        "scope": scope,
        "guided": measurer.guide is not None,
        "base_level": base_level,
        "group_size": recipe.group_size,
        "granularity": recipe.granularity,
        "unit": recipe.unit,
        "backend": measurer.backend.NAME,
        "levels": list(levels),
        "blocks": [b.name for b in blocks],
        "relative_sqnr": relative,
        "accumulated_sqnr_db": {k: _finite(v) for k, v in accumulated.items()},
        "worst_blocks": [b.name for b in worst],
        "per_layer_sqnr": per_layer,
        "sqnr_vs_step": {
            "steps": sorted(set(measurer.steps)),
            "timesteps": timesteps_of(measurer.trajectory),
            "uniform_base": [_finite(x) for x in untreated.sqnr_by_step.values()],
            "base_with_treatments": None
            if base_variant is None
            else [_finite(x) for x in base_variant.sqnr_by_step.values()],
            "plan": [_finite(x) for x in final.sqnr_by_step.values()],
        },
        "time_sensitive": {
            "threshold_octaves": TIME_DRIFT_OCTAVES,
            "layers": sorted(time_sensitive),
            "drift_octaves": {
                n: round(d, 3) for n, d in sorted(drifts.items(), key=lambda kv: -kv[1])
            },
        },
        "smoothing": {
            n: {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in s.items()
                if k != "scale"
            }
            for n, s in smoothing.items()
        },
        "treatment_gains": gains,
        "global": {
            "target_sqnr_db": target_sqnr_db,
            "budget_ratio": None if budget_bytes is not None else budget_ratio,
            "fixed_bytes": fixed,
            "base_layer_bytes": base_bytes,
            "base_denoiser_bytes": base_bytes + fixed,
            "budget_bytes": budget,
            "predicted_sqnr_db": _finite(choice.predicted_sqnr_db),
            "plan_layer_bytes": choice.weight_bytes,
            "plan_denoiser_bytes": choice.weight_bytes + fixed,
            "block_levels": choice.levels,
            "promotions": [
                {
                    "block": p.block,
                    "to": p.to_level,
                    "predicted_sqnr_db": _finite(p.predicted_sqnr_db),
                    "layer_bytes": p.weight_bytes,
                }
                for p in choice.promotions
            ],
        },
        "measured": {
            "uniform_base_sqnr_db": _finite(untreated.sqnr_db),
            "plan_sqnr_db": _finite(final.sqnr_db),
            "plan_layer_bytes": final.weight_bytes,
        },
        "trajectory_calls": len(measurer.trajectory),
    }
    return Result(
        model, _as_applied(plan, model, measurer.backend), analysis, time.perf_counter() - start
    )


def timesteps_of(calls: list[Call]) -> list[float]:
    """The timestep of each recorded sampling step, in step order."""
    seen = {}
    for c in calls:
        if c.step not in seen:
            seen[c.step] = timestep_of(c.args, c.kwargs)
    return [seen[s] for s in sorted(seen)]


def quantize_denoiser(
    denoiser: nn.Module,
    recipe: Recipe,
    calibration: list[Call],
    *,
    plan: dict[str, LayerPlan] | None = None,
    smoothing_scales: dict[str, torch.Tensor] | None = None,
    backend: str = "quanto",
) -> Result:
    """A quantized copy of ``denoiser`` by a uniform recipe, or by a given plan.

    A plan's smoothed layers get their scales from ``smoothing_scales`` or, when not given,
    from the input ranges seen on the calibration calls and the plan's alphas.
    """
    start = time.perf_counter()
    impl = backends.get(backend)
    blocks = find_blocks(denoiser, impl.LAYERS)
    if plan is None:
        if recipe.mixed_precision:
            raise ValueError(f"recipe {recipe.name} needs the sensitivity analysis: use analyze()")
        plan = uniform_plan(blocks, recipe)
    smoothed = [n for n, lp in plan.items() if lp.smoothing_alpha is not None]
    if smoothed and smoothing_scales is None:
        stats = layer_stats(denoiser, smoothed, calibration)
        smoothing_scales = {
            n: scales_for(
                stats.channel_absmax[n],
                weight_channel_absmax(denoiser.get_submodule(n).weight),
                plan[n].smoothing_alpha,
            )
            for n in smoothed
        }
    model = copy.deepcopy(denoiser).eval()
    impl.quantize_layers(model, specs_of(plan), calibration, smoothing_scales)
    return Result(model, _as_applied(plan, model, impl), {}, time.perf_counter() - start)
