"""The SQNR-driven method on one denoiser, in three parts (docs/quantization.md, steps 2-4):

- ``measure_sensitivity``: every unit x level from the recording (journaled: resumable);
- ``choose`` (the greedy planner on the table) and ``check``: the plan sampled end to end, the
  units it blames measured end to end too, the plan chosen again, until it meets its target,
  its budget stops it, or the checks allowed are spent;
- the report (``quantization.report.AnalysisReport``), written from what these return.

Local treatments are chosen before measuring (time-sensitive layers keep float activations;
SmoothQuant where a layer's own SQNR gains from it) and are part of every level's specs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from quantization.backends import Backend
from quantization.blocks import find_blocks
from quantization.capture import Call
from quantization.latency import Latencies, LatencyCache, input_shapes
from quantization.measure import TIME_DRIFT_OCTAVES, Measurer
from quantization.plan import LayerPlan, LevelChoice, greedy_plan, predicted_sqnr_db, specs_of
from quantization.table import Check, Entry, Journal, SensitivityTable, Unit
from quantization.types import LayerSpec, Recipe, level_spec

__all__ = [
    "Checked",
    "Treatments",
    "check",
    "check_levels",
    "choose",
    "find_units",
    "fit_to_replay",
    "fp_bytes",
    "frontier",
    "level_timings",
    "measure_sensitivity",
    "plan_at_levels",
    "time_levels",
    "uniform_plan",
]


def find_units(denoiser: nn.Module, layers: tuple[type[nn.Module], ...], unit: str) -> list[Unit]:
    """The planner's units ("block" or "module"), each with the block it lies in."""
    blocks = find_blocks(denoiser, layers, "block")
    block_of = {layer: b.name for b in blocks for layer in b.layers}
    return [
        Unit(u.name, block_of[u.layers[0]], u.layers) for u in find_blocks(denoiser, layers, unit)
    ]


def fp_bytes(denoiser: nn.Module, layers: tuple[str, ...] | list[str]) -> int:
    return sum(
        p.numel() * p.element_size()
        for n in layers
        for p in denoiser.get_submodule(n).parameters(recurse=False)
    )


@dataclass
class Treatments:
    """The local treatments chosen for a recipe: time-sensitive layers (float activations)
    and smoothed layers (alpha, scale and what it bought)."""

    time_sensitive: set[str] = field(default_factory=set)
    drifts: dict[str, float] = field(default_factory=dict)
    smoothing: dict[str, dict] = field(default_factory=dict)

    def scales(self, plan: Mapping[str, LayerPlan]) -> dict[str, torch.Tensor]:
        return {
            n: self.smoothing[n]["scale"]
            for n, lp in plan.items()
            if lp.smoothing_alpha is not None
        }


def plan_at_levels(
    units: list[Unit], levels: Mapping[str, str], recipe: Recipe, treatments: Treatments
) -> dict[str, LayerPlan]:
    """Every layer of every unit at its unit's level, with the local treatments."""
    plan = {}
    for u in units:
        spec = level_spec(levels[u.name], recipe.group_size, recipe.granularity)
        if spec is None:
            continue
        for layer in u.layers:
            protect = layer in treatments.time_sensitive
            activations = None if protect else spec.activations
            smoothed = treatments.smoothing.get(layer) if activations is not None else None
            plan[layer] = LayerPlan(
                spec.weights,
                activations,
                spec.group_size,
                spec.granularity,
                u.block,
                None if smoothed is None else smoothed["alpha"],
                protect,
            )
    return plan


def check_levels(backend: Backend, recipe: Recipe, device: str) -> None:
    """Before anything is measured: every level the recipe may give a unit (its base spec for
    a uniform one) is one ``backend`` can build on ``device``, else a ValueError that names
    the level and what the backend said (a level it cannot build would otherwise fail the
    analysis minutes in, at the first unit promoted to it)."""
    levels = recipe.levels or (None,)
    for level in levels:
        spec = (
            recipe.base_spec()
            if level is None
            else level_spec(level, recipe.group_size, recipe.granularity)
        )
        if spec is None:
            continue
        try:
            backend.check(spec, device)
        except ValueError as e:
            where = "its base" if level is None else f"level {level}"
            raise ValueError(
                f"recipe {recipe.name} on the {backend.NAME} backend, {where}: {e}"
            ) from None


def uniform_plan(units: list[Unit], recipe: Recipe) -> dict[str, LayerPlan]:
    """Every quantizable layer at the recipe's base spec."""
    spec = recipe.base_spec()
    return {
        layer: LayerPlan(
            spec.weights, spec.activations, spec.group_size, spec.granularity, block=u.block
        )
        for u in units
        for layer in u.layers
    }


def choose_treatments(
    measurer: Measurer, units: list[Unit], recipe: Recipe, smoothing: bool, time_protection: bool
) -> Treatments:
    """Time-sensitive layers from the recorded ranges; smoothing from the calibration inputs."""
    layers = [layer for u in units for layer in u.layers]
    treatments = Treatments(drifts=measurer.time_drifts(layers))
    if time_protection:
        treatments.time_sensitive = {
            n for n, d in treatments.drifts.items() if d >= TIME_DRIFT_OCTAVES
        }
    if smoothing:
        base = {u.name: recipe.levels[0] for u in units}
        untreated = plan_at_levels(
            units, base, recipe, Treatments(time_sensitive=treatments.time_sensitive)
        )
        treatments.smoothing = measurer.choose_smoothing(specs_of(untreated))
    return treatments


def _unit_specs(plan: Mapping[str, LayerPlan], unit: Unit) -> dict[str, LayerSpec]:
    return {n: plan[n].spec for n in unit.layers if n in plan}


def measure_sensitivity(
    measurer: Measurer,
    table: SensitivityTable,
    units: list[Unit],
    recipe: Recipe,
    treatments: Treatments,
    scope: str,
    journal: Journal,
    progress: Callable[[str], None] = lambda unit: None,
    latencies: Latencies | None = None,
) -> SensitivityTable:
    """Fill ``table`` with every unit at every level (rows already in ``journal`` are taken
    from it); ``progress`` is called after each measurement. With ``latencies``, each row
    also has its unit's layers timed at that level (float: as they are)."""
    denoiser = measurer.denoiser
    for u in units:
        for level in table.levels:
            key = (u.name, level)
            if key in journal.done:
                table.entries[key] = journal.done[key]
                progress(u.name)
                continue
            if level == "float":
                nbytes = fp_bytes(denoiser, u.layers)
                ms = None if latencies is None else latencies.unit_ms(u.layers, {})
                entry = Entry(u.name, level, None, nbytes, nbytes, _ms(ms))
            else:
                levels = {x.name: recipe.levels[0] for x in units}
                plan = plan_at_levels(units, {**levels, u.name: level}, recipe, treatments)
                specs = _unit_specs(plan, u)
                m = measurer.unit(u, u.block, specs, treatments.scales(plan), scope)
                float_mm = fp_bytes(denoiser, [n for n in specs if specs[n].activations is None])
                ms = None if latencies is None else latencies.unit_ms(u.layers, specs)
                entry = Entry(
                    u.name,
                    level,
                    None if math.isinf(m.sqnr_db) else m.sqnr_db,
                    m.weight_bytes,
                    float_mm,
                    _ms(ms),
                )
            journal.add(entry)
            table.entries[key] = entry
            progress(u.name)
    return table


def level_timings(
    units: list[Unit], recipe: Recipe, treatments: Treatments
) -> list[tuple[str, LayerSpec | None]]:
    """Every (layer, spec) the sensitivity rows time: each unit's layers at each level
    (None: float), with the local treatments."""
    pairs: list[tuple[str, LayerSpec | None]] = []
    for u in units:
        for level in recipe.levels:
            specs = _unit_specs(plan_at_levels([u], {u.name: level}, recipe, treatments), u)
            pairs += [(n, specs.get(n)) for n in u.layers]
    return pairs


def time_levels(
    denoiser: nn.Module,
    call: Call,
    backend: Backend,
    units: list[Unit],
    recipe: Recipe,
    treatments: Treatments,
    *,
    batch: int | None = None,
    cache: LatencyCache | None = None,
    stage: Callable[[Latencies, int], Callable[[str], None]] | None = None,
) -> Latencies:
    """Every unit's layers timed at every level of ``recipe`` on ``denoiser``'s device, on
    the input shapes of ``call`` (at ``batch``, where given), through ``cache`` (default: the
    device's cache file), which keeps them; what it already has is not timed again.
    ``stage(latencies, missing)`` opens the progress of the timings to come and returns what
    is called after each one. The sensitivity rows then read their latencies from it."""
    layers = [n for u in units for n in u.layers]
    latencies = Latencies(
        denoiser,
        input_shapes(denoiser, layers, call, batch),
        backend,
        cache or LatencyCache.open(),
        str(next(denoiser.parameters()).device),
    )
    pairs = level_timings(units, recipe, treatments)
    done = (lambda layer: None) if stage is None else stage(latencies, latencies.missing(pairs))
    began = time.perf_counter()
    for name, spec in pairs:
        if latencies.cache.get(latencies.device, latencies.key(name, spec)) is None:
            latencies.layer_ms(name, spec)  # kept in the cache: a layer of the same shape is not
            done(name)
    latencies.seconds = time.perf_counter() - began
    latencies.cache.save()
    return latencies


def _ms(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 4)


def choose(
    table: SensitivityTable,
    target_sqnr_db: float | None,
    budget_bytes: int | None,
    start: dict[str, str] | None = None,
    promotions: int | None = None,
) -> LevelChoice:
    """The greedy plan on the table's end-to-end predictions (``budget_bytes``: the whole
    denoiser, the float leftovers included), promoting from ``start`` if given, at most
    ``promotions`` times (a point of the frontier). A table timed on the device (latencies
    in every row) gives, for a target, the fastest plan that meets it within the budget
    (``greedy_plan``'s ``save_time``)."""
    return greedy_plan(
        table.options(),
        target_sqnr_db=target_sqnr_db,
        budget_bytes=None if budget_bytes is None else budget_bytes - table.fixed_bytes,
        start=start,
        promotions=promotions,
        save_time=target_sqnr_db is not None,
    )


def frontier(table: SensitivityTable) -> list[dict]:
    """Bytes of the whole denoiser against predicted end-to-end SQNR along the greedy path,
    from the base to every unit in float: the points a target or a budget can pick."""
    options = table.options()
    full = sum(max(o.weight_bytes for o in opts) for opts in options.values())
    path = greedy_plan(options, target_sqnr_db=None, budget_bytes=full)
    base = predicted_sqnr_db(options, {u: 0 for u in options})
    points: list[dict] = [
        {
            "point": 0,
            "denoiser_bytes": table.base_layer_bytes() + table.fixed_bytes,
            "predicted_sqnr_db": _db(base),
            "promoted": None,
        }
    ]
    for i, p in enumerate(path.promotions, 1):
        points.append(
            {
                "point": i,
                "denoiser_bytes": p.weight_bytes + table.fixed_bytes,
                "predicted_sqnr_db": _db(p.predicted_sqnr_db),
                "promoted": f"{p.block} -> {p.to_level}",
            }
        )
    return points


def _db(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 3)


CHECK_TIE_DB = 0.5  # end-to-end checks closer than this are a tie: the later plan is kept


@dataclass
class Checked:
    """The plan kept after the checks, its quantized denoiser and what measured it."""

    choice: LevelChoice
    plan: dict[str, LayerPlan]
    model: nn.Module
    latent_sqnr_db: float
    latents: torch.Tensor
    replayed_sqnr_db: float
    by_step: dict[int, float]
    refined: list[str]


def check(
    measurer: Measurer,
    table: SensitivityTable,
    units: list[Unit],
    recipe: Recipe,
    treatments: Treatments,
    *,
    target_sqnr_db: float | None,
    budget_bytes: int | None,
    checks: int,
    refine: int,
    journal: Journal,
    progress: Callable[[str], None] = lambda message: None,
) -> Checked:
    """Choose, sample the plan end to end, and while it misses its target (and checks are
    left): measure end to end the ``refine`` units the check blames most (those with the most
    predicted noise), fit the offset of the rest, and promote further from the checked plan
    (a later plan never takes back a promotion, so it spends at least the bytes of the last)."""
    by_name = {u.name: u for u in units}
    best: Checked | None = None
    previous: dict[str, str] | None = None
    promotions: list = []
    for round_ in range(max(checks, 1)):
        choice = choose(table, target_sqnr_db, budget_bytes, previous)
        if choice.levels == previous:
            break
        choice.promotions = promotions = promotions + choice.promotions
        previous = dict(choice.levels)
        plan = plan_at_levels(units, choice.levels, recipe, treatments)
        progress(f"check {round_ + 1}: sampling the plan end to end")
        model = measurer.quantized_copy(specs_of(plan), treatments.scales(plan))
        began = time.perf_counter()
        measured, latents = measurer.end_to_end(model)
        sampled = time.perf_counter() - began
        replayed = measurer.replayed(model)
        result = Checked(
            choice, plan, model, measured, latents, replayed.sqnr_db, replayed.by_step, []
        )
        table.checks.append(
            Check(
                None
                if math.isinf(choice.predicted_sqnr_db)
                else round(choice.predicted_sqnr_db, 3),
                None if math.isinf(measured) else round(measured, 3),
                choice.weight_bytes,
                dict(choice.levels),
                round(sampled, 2),
            )
        )
        # a later plan only adds precision: within the check's noise it is the one kept
        if (
            best is None
            or measured >= best.latent_sqnr_db - CHECK_TIE_DB
            or (target_sqnr_db is not None and measured >= target_sqnr_db)
        ):
            best = result
        if target_sqnr_db is None or measured >= target_sqnr_db or round_ + 1 >= checks:
            # the table then predicts what this check measured: a later re-plan from it
            # (quantize --analysis) starts from the measurement, not the recorded estimate
            table.fit_offset(table.checks[-1], _noise_by_unit(table, choice.levels))
            break
        noise = _noise_by_unit(table, choice.levels)
        blamed = [u for u in sorted(noise, key=lambda u: -noise[u]) if u not in table.end_to_end][
            :refine
        ]
        for name in blamed:
            level = choice.levels[name]
            kept = journal.end_to_end.get(name, {})
            if level in kept:  # measured before an interruption: the same value, not again
                value = kept[level]
            else:
                progress(f"check {round_ + 1}: {name} end to end")
                u = by_name[name]
                db = measurer.unit_end_to_end(u, _unit_specs(plan, u), treatments.scales(plan))
                journal.add_end_to_end(name, level, db)
                value = None if math.isinf(db) else db
            table.end_to_end.setdefault(name, {})[level] = value
            result.refined.append(name)
        table.fit_offset(table.checks[-1], _noise_by_unit(table, choice.levels))
    assert best is not None
    return best


def fit_to_replay(
    measurer: Measurer,
    table: SensitivityTable,
    units: list[Unit],
    recipe: Recipe,
    treatments: Treatments,
    choice: LevelChoice,
) -> tuple[nn.Module, float]:
    """A bare denoiser's check (no sampler): the chosen plan replayed on the recorded calls;
    the table's offset is fitted to what it measured. The quantized copy and its SQNR."""
    plan = plan_at_levels(units, choice.levels, recipe, treatments)
    model = measurer.quantized_copy(specs_of(plan), treatments.scales(plan))
    measured = measurer.replayed(model).sqnr_db
    table.checks.append(
        Check(
            _db(choice.predicted_sqnr_db), _db(measured), choice.weight_bytes, dict(choice.levels)
        )
    )
    table.fit_offset(table.checks[-1], _noise_by_unit(table, choice.levels))
    return model, measured


def _noise_by_unit(table: SensitivityTable, levels: Mapping[str, str]) -> dict[str, float]:
    """Each quantized unit's predicted relative noise power at its level in ``levels``."""
    options = table.options()
    return {
        u: 10 ** (-options[u][[o.level for o in options[u]].index(lv)].sqnr_db / 10)
        for u, lv in levels.items()
        if lv != "float"
    }
