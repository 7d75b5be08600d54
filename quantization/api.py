"""The package's one in-memory API: quantize a pipeline by a recipe, a plan or a saved analysis;
analyze it; load an artifact.

    from quantization import QuantizeOptions, load_quantized, open_source, quantize

    pipe = open_source("models/dit-digits")
    done = quantize(pipe, "w8a8", source="models/dit-digits")
    done.pipeline      # the source's components with the quantized denoiser
    done.plan          # {layer: LayerPlan}
    done.analysis      # AnalysisReport (SQNR-driven recipes), else None
    done.measured      # latent SQNR and PSNR of the check images, denoiser SQNR
    done.save("artifacts/dit-digits-w8a8")
    again = load_quantized("artifacts/dit-digits-w8a8")

Every run first times one denoiser call and states its plan of work (``quantization.cost``),
then calibrates, records the FP trajectory once, measures every unit from that recording,
checks the plan end to end and quantizes. The CLI, the worker, bench and the tests all go
through here.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from pipelines.generate import decode, guided_prediction
from pipelines.loader import DEFAULTS_FILE
from quality.metrics import psnr_db, sqnr_db
from quantization import backends
from quantization.activations import ActivationStats
from quantization.analysis import (
    Treatments,
    check,
    choose,
    choose_treatments,
    fp_bytes,
    frontier,
    measure_sensitivity,
    plan_at_levels,
    time_levels,
    uniform_plan,
)
from quantization.artifact import (
    load_quantized,
    open_source,
    read_analysis,
    save_analysis,
    save_artifact,
)
from quantization.calibration import Conditions
from quantization.capture import Call
from quantization.cost import WorkPlan
from quantization.denoiser import (
    AnalyzedDenoiser,
    QuantizedDenoiser,
    analyze_denoiser,
    quantize_denoiser,
)
from quantization.latency import Latencies
from quantization.measure import TIME_DRIFT_OCTAVES, Measurer
from quantization.options import QuantizeOptions
from quantization.plan import LayerPlan, LevelChoice, explain, specs_of
from quantization.probe import call_seconds
from quantization.progress import Progress, Silent
from quantization.recording import record_trajectory, recorded_steps
from quantization.report import AnalysisReport, rounded, write_report
from quantization.session import (
    Run,
    as_applied,
    budget_bytes_of,
    dtype_name,
    journal_header,
    planned_work,
    prepare,
    quantized_copy,
    sample_check_images,
    uniform_work,
    with_denoiser,
)
from quantization.table import Journal, SensitivityTable, Unit
from quantization.types import RECIPES, Recipe, get_recipe

__all__ = [
    "AnalyzedDenoiser",
    "Quantized",
    "QuantizedDenoiser",
    "analyze_denoiser",
    "analyze_pipeline",
    "load_quantized",
    "open_source",
    "plan_of_work",
    "quantize",
    "quantize_denoiser",
    "quantize_from_analysis",
]


@dataclass
class Quantized:
    """A quantized pipeline and how it was made and measured; ``save`` writes the artifact."""

    pipeline: object
    denoiser: nn.Module
    plan: dict[str, LayerPlan]
    backend: str
    recipe: Recipe | None  # None: quantized by a given plan
    analysis: AnalysisReport | None
    calibration: dict
    sampling: dict
    measured: dict
    source: str
    seconds: float
    work: dict = field(default_factory=dict)
    trajectory_series: dict = field(default_factory=dict, repr=False)
    plan_origin: str = "a given plan"
    levels: dict[str, dict] = field(default_factory=dict)  # per unit: level, layers, why
    table: SensitivityTable | None = field(default=None, repr=False)
    _fp: object = field(default=None, repr=False)
    _saved: dict = field(default_factory=dict, repr=False)  # what save_analysis writes

    def manifest(self) -> dict:
        return {
            "source": self.source,
            "recipe": asdict(self.recipe)
            if self.recipe is not None
            else {"name": "plan", "summary": self.plan_origin},
            "calibration": self.calibration,
            "sampling": self.sampling,
            "sensitivity": None if self.analysis is None else self.analysis.summary(),
            "measured": self.measured,
            "work": self.work,
            **({"levels": self.levels} if self.levels else {}),
        }

    def save(self, out: str | Path) -> dict:
        """Write the artifact folder (weights, plan, manifest, report, and the analysis a
        later ``quantize --analysis`` plans from); returns the manifest."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if self.table is not None and self._saved:
            save_analysis(out / "analysis", self.table, self.analysis, **self._saved)
        written = save_artifact(
            out,
            self._fp,
            self.denoiser,
            self.plan,
            self.manifest(),
            backend=self.backend,
            dtype=dtype_name(self.denoiser),
        )
        src = Path(self.source)
        if src.is_dir() and (src / DEFAULTS_FILE).is_file():
            (out / DEFAULTS_FILE).write_text((src / DEFAULTS_FILE).read_text())
        (out / "report.md").write_text(
            write_report(out, written, self.analysis, self.trajectory_series)
        )
        return written


def quantize(
    pipeline,
    recipe_or_plan: str | Recipe | dict[str, LayerPlan],
    *,
    options: QuantizeOptions | None = None,
    source: str | None = None,
    progress: Progress | None = None,
) -> Quantized:
    """Quantize ``pipeline``'s denoiser by a recipe (its name or a Recipe) or a plan.

    The FP pipeline is left as it was. ``source`` names the folder or hub id it came from
    (default: the pipeline's own ``name_or_path``): its defaults.json gives the sampling
    settings, and an embedded model's digits data the calibration conditions.
    """
    start = time.perf_counter()
    options = options or QuantizeOptions()
    progress = progress or Silent()
    if isinstance(recipe_or_plan, dict):
        return _by_plan(pipeline, recipe_or_plan, options, source, progress, start)
    recipe = get_recipe(recipe_or_plan) if isinstance(recipe_or_plan, str) else recipe_or_plan
    if recipe.mixed_precision:
        # quantize needs no detail pass; analyze has one unless told otherwise
        options = replace(options, detail=bool(options.detail))
        return _analyzed(pipeline, recipe, options, source, progress, start)
    source, r = prepare(pipeline, source, recipe, options)
    with Run(pipeline, source, r, progress) as run:
        n, work = uniform_work(run)
        progress.plan(work)
        stats: ActivationStats | None = None
        calibration: dict = {"kind": "none: per-token activations"}
        if r.recipe.static:
            stats, _, calibration = run.calibrate(r.calibration_prompts)
        stage = progress.stage("quantize", 1, "model")
        units = run.units["block"]
        plan = uniform_plan(units, r.recipe)
        model = quantized_copy(run, stats, specs_of(plan), {})
        stage.update()
        measured = sample_check_images(run, model, n)
        return Quantized(
            pipeline=with_denoiser(pipeline, run.attr, model),
            denoiser=model,
            plan=as_applied(plan, model, run.backend),
            backend=r.backend,
            recipe=r.recipe,
            analysis=None,
            calibration={**calibration, "conditions": r.conditions.summary()},
            sampling={"num_inference_steps": r.steps, "guidance_scale": r.guidance},
            measured=measured,
            source=str(source),
            seconds=time.perf_counter() - start,
            work={
                "estimate": work.to_json(),
                "actual": progress.done(),
                "calls": progress.calls(),
            },
            _fp=pipeline,
        )


def _by_plan(pipeline, plan: dict[str, LayerPlan], options, source, progress, start) -> Quantized:
    if not plan:
        raise ValueError("an empty plan quantizes nothing")
    grain = {lp.spec.granularity for lp in plan.values()} - {None}
    backend = options.backend or ("torchao" if "token" in grain else "quanto")
    base = get_recipe("w8a8-static").with_granularity("timestep" if "timestep" in grain else None)
    source, r = prepare(pipeline, source, base, replace(options, backend=backend))
    with Run(pipeline, source, r, progress) as run:
        stats: ActivationStats | None = None
        calibration: dict = {"kind": "none: per-token activations"}
        if grain - {"token"}:
            stats, _, calibration = run.calibrate(r.calibration_prompts)
        smoothed = [n for n, lp in plan.items() if lp.smoothing_alpha is not None]
        smoothing = {}
        if smoothed:
            from quantization.smoothing import smoothing_scales, weight_channel_absmax

            assert stats is not None
            smoothing = {
                n: smoothing_scales(
                    stats.channel_absmax(n),
                    weight_channel_absmax(run.denoiser.get_submodule(n).weight),
                    plan[n].smoothing_alpha or 0.5,
                )
                for n in smoothed
            }
        model = quantized_copy(run, stats, specs_of(plan), smoothing)
        measured = sample_check_images(run, model, 8 if r.check_images is None else r.check_images)
        return Quantized(
            pipeline=with_denoiser(pipeline, run.attr, model),
            denoiser=model,
            plan=as_applied(plan, model, run.backend),
            backend=backend,
            recipe=None,
            analysis=None,
            calibration={**calibration, "conditions": r.conditions.summary()},
            sampling={"num_inference_steps": r.steps, "guidance_scale": r.guidance},
            measured=measured,
            source=str(source),
            seconds=time.perf_counter() - start,
            _fp=pipeline,
        )


def plan_of_work(
    pipeline,
    recipe: str | Recipe,
    *,
    options: QuantizeOptions | None = None,
    source: str | None = None,
    progress: Progress | None = None,
) -> WorkPlan:
    """What ``quantize`` would do and how long each stage would take, from one timed call:
    nothing is calibrated or measured (the CLI's ``--dry-run``)."""
    progress = progress or Silent()
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    options = options or QuantizeOptions()
    if r.mixed_precision and options.detail is None:
        options = replace(options, detail=False)
    source, resolved = prepare(pipeline, source, r, options)
    with Run(pipeline, source, resolved, progress) as run:
        return planned_work(run)[0] if r.mixed_precision else uniform_work(run)[1]


def _analyzed(
    pipeline, recipe: Recipe, options: QuantizeOptions, source, progress, start
) -> Quantized:
    """The SQNR-driven recipes: probe, plan of work, calibrate, record, measure, check."""
    source, r = prepare(pipeline, source, recipe, options)
    with Run(pipeline, source, r, progress) as run:
        work, shape = planned_work(run)
        effort = work.effort
        assert effort is not None
        progress.plan(work)

        stats: ActivationStats | None = None
        calls: list = []
        calibration: dict = {"kind": "none: per-token activations"}
        if shape.static:
            stats, calls, calibration = run.calibrate(effort.calibration_prompts)
        trajectory = r.conditions.pick(run.pipe, effort.prompts, "trajectory")
        keep = recorded_steps(r.steps, effort.recorded_steps)
        stage = progress.stage("trajectory", r.steps, "step")
        recording = record_trajectory(
            run.denoiser,
            lambda: run.latents(run.denoiser, trajectory, "trajectory"),
            keep=keep,
            blocks=[u.name for u in run.units["block"]],
            layers=run.layers,
            progress=lambda step: stage.update(),
        )
        guide = guided_prediction(run.pipe, r.guidance) if r.guided else None
        measurer = Measurer(
            run.denoiser,
            recording,
            run.backend,
            calibration=stats,
            calibration_calls=calls,
            guide=guide,
            sampler=lambda model: run.latents(model, trajectory, "trajectory"),
        )
        units = run.units[effort.unit]
        stage = progress.stage("treatments", 1, "pass")
        treatments = choose_treatments(measurer, units, r.recipe, r.smoothing, r.time_protection)
        stage.update()
        latencies = None
        if r.recipe.latency_cost:
            latencies = _timed(run, recording.calls[0], units, r.recipe, treatments, progress)

        header = journal_header(run, effort, trajectory, calibration)
        header["latency"] = None if latencies is None else latencies.device
        journal = Journal(r.analysis_dir, header, r.resume)
        table = SensitivityTable(
            measured_on={**header, "sampling_seconds": round(recording.seconds, 2)},
            units=units,
            levels=list(r.recipe.levels),
        )
        table.fixed_bytes = backends.tensor_bytes(
            {k: v for k, v in run.denoiser.state_dict().items() if v is not None}
        ) - fp_bytes(run.denoiser, run.layers)
        done_before = len(journal.done)
        stage = progress.stage("sensitivity", len(units) * len(table.levels), "unit x level")
        if done_before:
            progress.note(f"resuming: {done_before} unit x level rows from {journal.path}")
        measure_sensitivity(
            measurer,
            table,
            units,
            r.recipe,
            treatments,
            effort.scope,
            journal,
            progress=lambda unit: stage.update(detail=unit),
            latencies=latencies,
        )
        budget = budget_bytes_of(table, r)
        stage = progress.stage("checks", effort.checks, "check")
        checked = check(
            measurer,
            table,
            units,
            r.recipe,
            treatments,
            target_sqnr_db=r.target_sqnr_db,
            budget_bytes=budget,
            checks=effort.checks,
            refine=effort.refine,
            journal=journal,
            progress=lambda message: stage.update(0, message),
        )
        stage.update(len(table.checks))
        extra = _detail(measurer, run, units, table, treatments, progress) if effort.detail else {}
        images = decode(run.pipe, recording.latents), decode(run.pipe, checked.latents)
        measured = {
            "check_images": len(trajectory),
            "check_conditions": "trajectory",
            "sqnr_latent_db": rounded(checked.latent_sqnr_db),
            "psnr_db": rounded(psnr_db(*images)),
            "denoiser_sqnr_db": rounded(checked.replayed_sqnr_db),
        }
        timesteps = [rounded(t) for t in recording.timesteps]
        series = {"plan": [rounded(x) for x in checked.by_step.values()]}
        if "uniform_base_by_step" in extra:
            series["uniform base"] = extra.pop("uniform_base_by_step")
        report = _report(
            run,
            effort,
            table,
            treatments,
            checked,
            budget,
            measured,
            work,
            extra,
            timesteps,
            series,
        )
        report.work.update(actual=progress.done(), calls=progress.calls())
        model = checked.model
        return Quantized(
            pipeline=with_denoiser(pipeline, run.attr, model),
            denoiser=model,
            plan=as_applied(checked.plan, model, run.backend),
            backend=r.backend,
            recipe=r.recipe,
            analysis=report,
            calibration={**calibration, "conditions": r.conditions.summary()},
            sampling={"num_inference_steps": r.steps, "guidance_scale": r.guidance},
            measured=measured,
            source=str(source),
            seconds=time.perf_counter() - start,
            work=report.work,
            trajectory_series={"timesteps": timesteps, "series": series},
            levels=unit_levels(table, checked.choice, r.target_sqnr_db),
            table=table,
            _fp=pipeline,
            _saved={"stats": stats, "treatments": treatments, "latents": recording.latents},
        )


def _timed(
    run: Run,
    call: Call,
    units: list[Unit],
    recipe: Recipe,
    treatments: Treatments,
    progress: Progress,
) -> Latencies:
    """Every unit's layers timed at every level on this device (what its cache lacks), at
    the batch of ``--latency-images`` (one request by default), not the measuring batch."""

    def stage(latencies: Latencies, missing: int):
        progress.note(
            f"latency: {missing} layer timings to measure on {latencies.device} "
            f"(cached in {latencies.cache.path})"
        )
        bar = progress.stage("latency", missing, "timing")
        return lambda layer: bar.update(detail=layer)

    batch = run.r.latency_images * (2 if run.guided else 1)
    return time_levels(
        run.denoiser, call, run.backend, units, recipe, treatments, batch=batch, stage=stage
    )


def unit_levels(
    table: SensitivityTable, choice: LevelChoice, target_sqnr_db: float | None
) -> dict[str, dict]:
    """Per unit: its level, its layers, and why the planner left it there (a manifest's
    ``levels``)."""
    reasons = explain(table.options(), choice, target_sqnr_db)
    return {
        u.name: {
            "level": choice.levels[u.name],
            "layers": list(u.layers),
            "reason": reasons[u.name],
        }
        for u in table.units
    }


def _detail(
    measurer: Measurer,
    run: Run,
    units: list[Unit],
    table: SensitivityTable,
    treatments: Treatments,
    progress,
) -> dict:
    """Accumulated SQNR per block, per-layer SQNR in the two worst units, treatments' gains."""
    r = run.r
    blocks = run.units["block"]
    base = {u.name: r.recipe.levels[0] for u in blocks}
    base_plan = plan_at_levels(blocks, base, r.recipe, treatments)
    stage = progress.stage("detail", len(blocks) + 4, "replay")
    accumulated = measurer.accumulated(
        [b.name for b in blocks],
        {b.name: {n: base_plan[n].spec for n in b.layers if n in base_plan} for b in blocks},
        treatments.scales(base_plan),
        progress=lambda: stage.update(),
    )
    gains: dict[str, float | None] = {}
    variants = {
        "uniform_base_sqnr_db": Treatments(),
        "with_time_protection_sqnr_db": Treatments(time_sensitive=treatments.time_sensitive),
        "with_smoothing_sqnr_db": Treatments(smoothing=treatments.smoothing),
        "with_both_sqnr_db": treatments,
    }
    by_step = {}
    for name, t in variants.items():
        plan = plan_at_levels(blocks, base, r.recipe, t)
        m = measurer.replayed(measurer.quantized_copy(specs_of(plan), t.scales(plan)))
        gains[name] = rounded(m.sqnr_db)
        if name == "uniform_base_sqnr_db":
            by_step = m.by_step
        stage.update()
    level = r.recipe.levels[0]
    worst = sorted(units, key=lambda u: _finite_or_inf(table.entries[(u.name, level)].sqnr_db))[:2]
    per_layer = {}
    for u in worst:
        for layer in u.layers:
            if layer not in base_plan:
                continue
            local, at_block = measurer.layer(
                layer, u.block, base_plan[layer].spec, treatments.scales({layer: base_plan[layer]})
            )
            per_layer[layer] = {
                "layer_output_sqnr_db": rounded(local),
                "block_output_sqnr_db": rounded(at_block),
            }
    stage.update()
    return {
        "accumulated_sqnr_db": {k: rounded(v) for k, v in accumulated.items()},
        "treatment_gains": gains,
        "per_layer_sqnr": per_layer,
        "uniform_base_by_step": [rounded(x) for x in by_step.values()],
    }


def _report(
    run, effort, table, treatments, checked, budget, measured, work, extra, timesteps, series
) -> AnalysisReport:
    r = run.r
    relative = {
        u.name: {
            lv: {
                "sqnr_db": table.entries[(u.name, lv)].sqnr_db,
                "weight_bytes": table.entries[(u.name, lv)].weight_bytes,
                "latency_ms": table.entries[(u.name, lv)].latency_ms,
            }
            for lv in table.levels
        }
        for u in table.units
    }
    report = AnalysisReport(
        recipe=r.recipe.name,
        backend=r.backend,
        scope=effort.scope,
        unit=effort.unit,
        guided=table.measured_on["guided"],
        effort=asdict(effort),
        levels=list(table.levels),
        units=[u.name for u in table.units],
        relative_sqnr=relative,
        end_to_end=table.end_to_end,
        time_sensitive={
            "threshold_octaves": TIME_DRIFT_OCTAVES,
            "layers": sorted(treatments.time_sensitive),
            "drift_octaves": {
                n: round(d, 3) for n, d in sorted(treatments.drifts.items(), key=lambda kv: -kv[1])
            },
        },
        smoothing={
            n: {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in s.items()
                if k != "scale"
            }
            for n, s in treatments.smoothing.items()
        },
        target_sqnr_db=r.target_sqnr_db,
        budget_bytes=budget,
        budget_ratio=r.budget_ratio,
        fixed_bytes=table.fixed_bytes,
        base_denoiser_bytes=table.base_layer_bytes() + table.fixed_bytes,
        plan_denoiser_bytes=checked.choice.weight_bytes + table.fixed_bytes,
        predicted_sqnr_db=rounded(checked.choice.predicted_sqnr_db),
        block_levels=dict(checked.choice.levels),
        promotions=[
            {
                "block": p.block,
                "to": p.to_level,
                "predicted_sqnr_db": rounded(p.predicted_sqnr_db),
                "layer_bytes": p.weight_bytes,
                "gain_db": rounded(p.gain_db),
                "added_ms": None if p.added_ms is None else round(p.added_ms, 4),
            }
            for p in checked.choice.promotions
        ],
        checks=[asdict(c) for c in table.checks],
        offset_db=table.offset_db,
        measured=measured,
        sqnr_vs_step={"timesteps": timesteps, "series": series},
        frontier=frontier(table),
        work={"estimate": work.to_json()},
        accumulated_sqnr_db=extra.get("accumulated_sqnr_db", {}),
        per_layer_sqnr=extra.get("per_layer_sqnr", {}),
        treatment_gains=extra.get("treatment_gains", {}),
    )
    return report


def analyze_pipeline(
    pipeline,
    recipe: str | Recipe = "w4a8-sqnr",
    *,
    options: QuantizeOptions | None = None,
    source: str | None = None,
    progress: Progress | None = None,
) -> Quantized:
    """The sensitivity analysis of an SQNR-driven recipe and the plan it leads to (checked end
    to end); ``options.analysis_dir`` keeps its journal, ``save_analysis`` the rest."""
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if not r.mixed_precision:
        mixed = [x.name for x in RECIPES.values() if x.mixed_precision]
        raise ValueError(
            f"analyze studies an SQNR-driven recipe ({', '.join(mixed)}), not {r.name}"
        )
    options = options or QuantizeOptions()
    options = replace(options, detail=True if options.detail is None else options.detail)
    return quantize(pipeline, r, options=options, source=source, progress=progress)


def quantize_from_analysis(
    pipeline,
    folder: str | Path,
    *,
    options: QuantizeOptions | None = None,
    source: str | None = None,
    progress: Progress | None = None,
    point: int | None = None,
) -> Quantized:
    """Plan again from a saved analysis (``analyze --out``, or an artifact's ``analysis/``)
    to another target or budget, or to a frontier ``point``: no sensitivity is measured."""
    start = time.perf_counter()
    options = options or QuantizeOptions()
    progress = progress or Silent()
    saved = read_analysis(Path(folder))
    table: SensitivityTable = saved["table"]
    on = table.measured_on
    recipe = get_recipe(on["recipe"]).with_granularity(on["granularity"])
    for given, saved_as, flag in (
        (options.num_inference_steps, on["steps"], "--steps"),
        (options.guidance_scale, on["guidance"], "--guidance"),
        (options.backend, on["backend"], "--backend"),
    ):
        if given is not None and given != saved_as:
            raise ValueError(f"the analysis was measured with {flag} {saved_as}, not {given}")
    options = replace(
        options,
        backend=options.backend or on["backend"],
        num_inference_steps=options.num_inference_steps or on["steps"],
        guidance_scale=options.guidance_scale or on["guidance"],
        smoothing=on["smoothing"],
        time_protection=on["time_protection"],
        conditions=options.conditions
        or Conditions(
            "classes" if all(isinstance(c, int) for c in on["conditions"]) else "prompts",
            tuple(on["conditions"]),
            f"{folder}",
        ),
    )
    source, r = prepare(pipeline, source, recipe, options, from_analysis=True)
    if r.backend != on["backend"]:
        raise ValueError(f"the analysis was measured on {on['backend']}, not {r.backend}")
    with Run(pipeline, source, r, progress) as run:
        progress.note(
            f"planning from {folder}: no new sensitivity measurement (the table holds "
            f"{len(table.units)} {on['unit']}s x {len(table.levels)} levels)"
        )
        units = table.units
        treatments: Treatments = saved["treatments"]
        points = frontier(table)
        if point is not None:
            if not 0 <= point < len(points):
                raise ValueError(f"--point must lie in 0..{len(points) - 1}")
            choice = choose(table, None, None, promotions=point)
        else:
            choice = choose(table, r.target_sqnr_db, budget_bytes_of(table, r))
        k = len(choice.promotions)
        on_path = k < len(points) and all(
            points[i + 1]["promoted"] == f"{p.block} -> {p.to_level}"
            for i, p in enumerate(choice.promotions)
        )
        where = f"the frontier's point {k}" if on_path else "a plan off the frontier's path"
        progress.note(
            f"took {where}: {choice.weight_bytes + table.fixed_bytes} bytes, "
            f"predicted {rounded(choice.predicted_sqnr_db)} dB"
        )
        budget = None if point is not None else budget_bytes_of(table, r)
        if (
            budget is not None
            and r.target_sqnr_db is not None
            and choice.predicted_sqnr_db < r.target_sqnr_db
        ):
            progress.note(
                f"the target {r.target_sqnr_db:g} dB is not predicted within the budget of "
                f"{budget} bytes: a larger --budget-ratio or --budget-bytes buys more precision"
            )
        plan = plan_at_levels(units, choice.levels, recipe, treatments)
        stage = progress.stage("quantize", 1, "model")
        model = quantized_copy(run, saved["stats"], specs_of(plan), treatments.scales(plan))
        stage.update()
        measured: dict = {
            "predicted_sqnr_db": rounded(choice.predicted_sqnr_db),
            "frontier_point": k if on_path else None,
        }
        seconds_left = r.max_minutes * 60 - (time.perf_counter() - start)
        fp_latents = saved["latents"]
        conditions = list(on["conditions"])
        # a quantized sampling can be far slower than FP's on a CPU: the check's cost is one
        # timed call of this quantized denoiser at the check's batch, times the steps
        per_sampling = None
        if fp_latents is not None:
            per_sampling = r.steps * call_seconds(
                model, lambda: run.latents(model, conditions, "trajectory")
            )
            seconds_left = r.max_minutes * 60 - (time.perf_counter() - start)
        if per_sampling is not None and per_sampling < seconds_left:
            progress.note(f"end-to-end check: ~{per_sampling:.0f} s")
            stage = progress.stage("check", 1, "sampling")
            q = run.latents(model, conditions, "trajectory")
            stage.update()
            measured.update(
                {
                    "check_images": len(conditions),
                    "check_conditions": "trajectory",
                    "sqnr_latent_db": rounded(sqnr_db(fp_latents, q)),
                    "psnr_db": rounded(psnr_db(decode(run.pipe, fp_latents), decode(run.pipe, q))),
                }
            )
        else:
            progress.note(
                "end-to-end check skipped: "
                + (
                    "the analysis kept no FP latents to check against"
                    if per_sampling is None
                    else f"~{per_sampling:.0f} s does not fit the {seconds_left:.0f} s "
                    "left of --max-minutes"
                )
            )
        return Quantized(
            pipeline=with_denoiser(pipeline, run.attr, model),
            denoiser=model,
            plan=as_applied(plan, model, run.backend),
            backend=r.backend,
            recipe=recipe,
            analysis=None,
            calibration={**on["calibration"], "conditions": r.conditions.summary()},
            sampling={"num_inference_steps": r.steps, "guidance_scale": r.guidance},
            measured=measured,
            source=str(source),
            seconds=time.perf_counter() - start,
            plan_origin=f"planned from {folder}",
            work={"actual": progress.done(), "calls": progress.calls()},
            levels=unit_levels(table, choice, None if point is not None else r.target_sqnr_db),
            _fp=pipeline,
        )


def _finite_or_inf(x: float | None) -> float:
    return math.inf if x is None else x
