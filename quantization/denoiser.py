"""The method on a bare denoiser and given calls, no pipeline: a uniform recipe or a plan
(``quantize_denoiser``), or the SQNR-driven plan measured on the calls with no end-to-end check
(``analyze_denoiser``): synthetic inputs at a full-size shape (bench.full_size), tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from quantization import backends
from quantization.activations import collect_stats, ranges_for
from quantization.analysis import (
    Treatments,
    check_levels,
    choose,
    choose_treatments,
    find_units,
    fit_to_replay,
    fp_bytes,
    measure_sensitivity,
    plan_at_levels,
    time_levels,
    uniform_plan,
)
from quantization.latency import LatencyCache
from quantization.measure import Measurer
from quantization.plan import LayerPlan, LevelChoice, specs_of
from quantization.recording import record_calls_replayed
from quantization.session import as_applied
from quantization.table import Journal, SensitivityTable
from quantization.types import Recipe, get_recipe

__all__ = ["AnalyzedDenoiser", "QuantizedDenoiser", "analyze_denoiser", "quantize_denoiser"]


@dataclass
class QuantizedDenoiser:
    """A quantized copy of a bare denoiser and the plan it was quantized by."""

    model: nn.Module
    plan: dict[str, LayerPlan]


def quantize_denoiser(
    denoiser: nn.Module,
    recipe_or_plan: str | Recipe | dict[str, LayerPlan],
    calls: list,
    *,
    backend: str | None = None,
    smoothing: dict[str, torch.Tensor] | None = None,
) -> QuantizedDenoiser:
    """A quantized copy of ``denoiser`` by a uniform recipe or a plan, its static activations
    calibrated on ``calls`` (the FP denoiser is left as it was). A plan's smoothed layers get
    ``smoothing`` scales, or scales from the calls' ranges and the plan's alphas."""
    from quantization.smoothing import smoothing_scales, weight_channel_absmax

    if isinstance(recipe_or_plan, dict):
        plan = recipe_or_plan
        impl = backends.get(backend or "quanto")
    else:
        recipe = get_recipe(recipe_or_plan) if isinstance(recipe_or_plan, str) else recipe_or_plan
        if recipe.mixed_precision:
            raise ValueError(f"recipe {recipe.name} is planned: quantize() its pipeline")
        impl = backends.get(backend or recipe.backend)
        plan = uniform_plan(find_units(denoiser, impl.LAYERS, "block"), recipe)
    stats = collect_stats(denoiser, list(plan), calls) if calls else None
    smoothing = dict(smoothing or {})
    for name, lp in plan.items():
        if lp.smoothing_alpha is not None and name not in smoothing:
            if stats is None:
                raise ValueError("smoothed layers need calibration calls")
            w = weight_channel_absmax(denoiser.get_submodule(name).weight)
            smoothing[name] = smoothing_scales(stats.channel_absmax(name), w, lp.smoothing_alpha)
    model = copy.deepcopy(denoiser).eval()
    ranges = ranges_for(stats, specs_of(plan), smoothing)
    impl.quantize_layers(model, specs_of(plan), ranges, smoothing)
    return QuantizedDenoiser(model, as_applied(plan, model, impl))


@dataclass
class AnalyzedDenoiser:
    """A bare denoiser's plan, measured on given calls with no sampler (so never checked
    end to end): the quantized copy, the plan, the choice, the treatments and the table."""

    model: nn.Module
    plan: dict[str, LayerPlan]
    choice: LevelChoice
    treatments: Treatments
    table: SensitivityTable


def analyze_denoiser(
    denoiser: nn.Module,
    recipe: str | Recipe,
    calibration_calls: list,
    trajectory_calls: list,
    *,
    backend: str | None = None,
    unit: str = "module",
    scope: str = "denoiser",
    target_sqnr_db: float | None = None,
    budget_bytes: int | None = None,
    budget_ratio: float | None = None,
    checks: int = 0,
    latency_cache: LatencyCache | None = None,
) -> AnalyzedDenoiser:
    """The SQNR-driven plan of a denoiser on its own (synthetic inputs, a full-size shape with
    random weights): every unit measured on ``trajectory_calls``, planned to the recipe's
    target (or the one given) within the budget. No sampler, so no end-to-end check; with
    ``checks``, plans are replayed on the calls instead: the base recipe first, then each
    plan while it misses the target, the table's offset fitted to each (units measured on
    their block alone predict far more noise than a whole denoiser shows: SD 1.5's UNet),
    and the plan chosen again from the last (promotions are never taken back). A recipe priced
    by latency times its layers on the first trajectory call's shapes, through
    ``latency_cache`` (default: the device's cache file)."""
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    impl = backends.get(backend or r.backend)
    check_levels(impl, r, str(next(denoiser.parameters()).device))
    blocks = find_units(denoiser, impl.LAYERS, "block")
    layers = [layer for b in blocks for layer in b.layers]
    stats = collect_stats(denoiser, layers, calibration_calls) if r.static else None
    recording = record_calls_replayed(
        denoiser, trajectory_calls, blocks=[b.name for b in blocks], layers=layers
    )
    measurer = Measurer(
        denoiser, recording, impl, calibration=stats, calibration_calls=calibration_calls
    )
    units = find_units(denoiser, impl.LAYERS, unit)
    treatments = choose_treatments(measurer, units, r, r.smoothing, r.protect_time_sensitive)
    latencies = None
    if r.latency_cost:
        latencies = time_levels(
            denoiser, trajectory_calls[0], impl, units, r, treatments, cache=latency_cache
        )
    table = SensitivityTable(
        measured_on={
            "recipe": r.name,
            "scope": scope,
            "unit": unit,
            "latency": None if latencies is None else latencies.device,
            **(
                {}
                if latencies is None
                else {
                    "latency_timings": {
                        "timed": latencies.timed,
                        "seconds": round(latencies.seconds, 2),
                    }
                }
            ),
        },
        units=units,
        levels=list(r.levels),
    )
    state = {k: v for k, v in denoiser.state_dict().items() if v is not None}
    table.fixed_bytes = backends.tensor_bytes(state) - fp_bytes(denoiser, layers)
    measure_sensitivity(
        measurer, table, units, r, treatments, scope, Journal(None, {}, False), latencies=latencies
    )
    base = table.base_layer_bytes() + table.fixed_bytes
    if budget_bytes is None:
        ratio = r.budget_ratio if budget_ratio is None else budget_ratio
        budget_bytes = int(base * ratio)
    if budget_bytes < base:
        raise ValueError(
            f"budget of {budget_bytes} bytes is below the {base} bytes the base recipe already "
            f"makes the denoiser ({table.fixed_bytes} of them stay float whatever the plan)"
        )
    target = r.target_sqnr_db if target_sqnr_db is None else target_sqnr_db
    previous: dict[str, str] | None = None
    if checks:
        unplanned = choose(table, None, budget_bytes, None, promotions=0)
        fit_to_replay(measurer, table, units, r, treatments, unplanned)
    promotions: list = []
    for round_ in range(max(checks, 1)):
        choice = choose(table, target, budget_bytes, previous)
        choice.promotions = promotions = promotions + choice.promotions
        if not checks:
            break
        model, measured = fit_to_replay(measurer, table, units, r, treatments, choice)
        if measured >= target or choice.levels == previous or round_ + 1 >= checks:
            break
        previous = dict(choice.levels)
    plan = plan_at_levels(units, choice.levels, r, treatments)
    if not checks:
        model = measurer.quantized_copy(specs_of(plan), treatments.scales(plan))
    return AnalyzedDenoiser(model, as_applied(plan, model, impl), choice, treatments, table)
