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

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from pipelines.generate import decode, final_latents, guided_prediction, sample
from pipelines.loader import DEFAULTS_FILE, sampling_settings
from quality.metrics import psnr_db, sqnr_db
from quantization import backends
from quantization.activations import ActivationStats, collect_stats, ranges_for
from quantization.analysis import (
    Treatments,
    check,
    choose,
    choose_treatments,
    find_units,
    fp_bytes,
    frontier,
    measure_sensitivity,
    plan_at_levels,
    uniform_plan,
)
from quantization.artifact import (
    DTYPES,
    load_quantized,
    open_source,
    read_analysis,
    save_analysis,
    save_artifact,
)
from quantization.blocks import denoiser_attr, denoiser_swapped
from quantization.calibration import SEEDS, Conditions, record_calibration, resolve_conditions
from quantization.cost import Effort, Shape, Timings, WorkPlan, choose_effort, estimate
from quantization.measure import TIME_DRIFT_OCTAVES, Measurer
from quantization.options import QuantizeOptions, Resolved, resolve
from quantization.plan import LayerPlan, LevelChoice, specs_of
from quantization.probe import probe
from quantization.progress import Progress, Silent
from quantization.recording import record_calls_replayed, record_trajectory, recorded_steps
from quantization.report import AnalysisReport, rounded, write_report
from quantization.table import Journal, SensitivityTable, Unit
from quantization.types import RECIPES, Recipe, get_recipe, level_spec

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
            dtype=_dtype_name(self.denoiser),
        )
        src = Path(self.source)
        if src.is_dir() and (src / DEFAULTS_FILE).is_file():
            (out / DEFAULTS_FILE).write_text((src / DEFAULTS_FILE).read_text())
        (out / "report.md").write_text(
            write_report(out, written, self.analysis, self.trajectory_series)
        )
        return written


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
    return QuantizedDenoiser(model, _as_applied(plan, model, impl))


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
) -> AnalyzedDenoiser:
    """The SQNR-driven plan of a denoiser on its own (synthetic inputs, a full-size shape with
    random weights): every unit measured on ``trajectory_calls``, planned to the recipe's
    target (or the one given) within the budget, no end-to-end check."""
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    impl = backends.get(backend or r.backend)
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
    table = SensitivityTable(
        measured_on={"recipe": r.name, "scope": scope, "unit": unit},
        units=units,
        levels=list(r.levels),
    )
    state = {k: v for k, v in denoiser.state_dict().items() if v is not None}
    table.fixed_bytes = backends.tensor_bytes(state) - fp_bytes(denoiser, layers)
    measure_sensitivity(measurer, table, units, r, treatments, scope, Journal(None, {}, False))
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
    choice = choose(table, target, budget_bytes)
    plan = plan_at_levels(units, choice.levels, r, treatments)
    model = measurer.quantized_copy(specs_of(plan), treatments.scales(plan))
    return AnalyzedDenoiser(model, _as_applied(plan, model, impl), choice, treatments, table)


def _dtype_name(module: nn.Module) -> str:
    names = {dtype: name for name, dtype in DTYPES.items()}
    floats = [p.dtype for p in module.parameters() if p.dtype in names]
    floats += [b.dtype for b in module.buffers() if b.dtype in names]
    return names[floats[0]] if floats else "fp32"


def _source_of(pipe) -> str:
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", ""))


def _with_denoiser(pipe, attr: str, denoiser: nn.Module):
    """A pipeline sharing ``pipe``'s other components, with ``denoiser`` in place."""
    new = copy.copy(pipe)
    new.register_modules(**{attr: denoiser})
    return new


def _as_applied(plan: dict[str, LayerPlan], model: nn.Module, backend) -> dict[str, LayerPlan]:
    """The plan with the group sizes the layers really got (a group wider than a row: per row)."""
    applied = backend.layer_specs(model)
    return {n: replace(lp, group_size=applied[n].group_size) for n, lp in plan.items()}


class _Run:
    """One quantization or analysis of one pipeline: resolved settings, the denoiser, its
    units, the probe's timings, and the stages in the order they run."""

    def __init__(self, pipe, source: str, r: Resolved, progress: Progress) -> None:
        self.pipe, self.source, self.r, self.progress = pipe, source, r, progress
        self.attr = denoiser_attr(pipe)
        self.denoiser: nn.Module = getattr(pipe, self.attr).eval()
        self.backend = backends.get(r.backend)
        self.units = {
            k: find_units(self.denoiser, self.backend.LAYERS, k) for k in ("block", "module")
        }
        self.layers = [layer for u in self.units["block"] for layer in u.layers]
        if not self.layers:
            raise ValueError(f"{source}: no layer the {r.backend} backend quantizes")
        self.guided = r.guidance > 1.0
        self._handles: list = []
        self._timings: Timings | None = None

    def __enter__(self) -> _Run:
        """Counts denoiser calls, and block calls outside them, per stage (the FP denoiser's
        hooks are removed on exit)."""
        inside = [False]

        def enter(module, args):
            inside[0] = True
            self.progress.count("denoiser")

        def leave(module, args, out):
            inside[0] = False

        def block(module, args):
            if not inside[0]:
                self.progress.count("blocks")

        self._handles = [
            self.denoiser.register_forward_pre_hook(enter),
            self.denoiser.register_forward_hook(leave),
        ]
        for u in self.units["block"]:
            self._handles.append(
                self.denoiser.get_submodule(u.name).register_forward_pre_hook(block)
            )
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def work(self, estimate: WorkPlan) -> dict:
        return {
            "estimate": estimate.to_json(),
            "actual": self.progress.done(),
            "calls": self.progress.calls(),
        }

    def seeds(self, use: str, n: int) -> list[int]:
        return [SEEDS[use] + i for i in range(n)]

    def latents(self, model: nn.Module, conditions: list, use: str) -> torch.Tensor:
        with denoiser_swapped(self.pipe, model):
            return final_latents(
                self.pipe,
                conditions,
                self.seeds(use, len(conditions)),
                num_inference_steps=self.r.steps,
                guidance_scale=self.r.guidance,
            )

    def timings(self, levels: dict) -> Timings:
        one = self.r.conditions.pick(self.pipe, 1, "trajectory")
        stage = self.progress.stage("probe", 1, "call")
        t, _ = probe(
            self.denoiser,
            lambda: final_latents(
                self.pipe,
                one,
                self.seeds("trajectory", 1),
                num_inference_steps=self.r.steps,
                guidance_scale=self.r.guidance,
            ),
            [u.name for u in self.units["block"]],
            self.backend,
            levels,
            lambda z: decode(self.pipe, z),
        )
        stage.update()
        return t

    def shape(self, levels: int, planned: bool, check_images: int) -> Shape:
        assert self._timings is not None, "probe first"
        order = list(self._timings.block_seconds)
        return Shape(
            steps=self.r.steps,
            guided=self.guided,
            units={
                k: sorted((u.block for u in us), key=order.index) for k, us in self.units.items()
            },
            levels=levels,
            static=self.r.recipe.static or self.r.smoothing,
            multi_step_calibration=self.r.calibration == "multi-step",
            planned=planned,
            denoiser_gb=fp_bytes(self.denoiser, self.layers) / 1e9,
            check_images=check_images,
            pipeline_gb=sum(
                p.numel() * p.element_size()
                for c in self.pipe.components.values()
                if isinstance(c, nn.Module)
                for p in c.parameters()
            )
            / 1e9,
        )

    def calibrate(self, prompts: int) -> tuple[ActivationStats, list, dict]:
        """The calibration calls (single- or multi-step) and every layer's ranges on them."""
        stage = self.progress.stage("calibration", 2, "pass")
        conditions = self.r.conditions.pick(self.pipe, prompts, "calibration")
        calib = record_calibration(
            self.pipe,
            self.attr,
            conditions,
            kind=self.r.calibration,
            k=self.r.calibration_steps,
            num_inference_steps=self.r.steps,
            guidance_scale=self.r.guidance,
        )
        stage.update(detail=f"{len(calib.calls)} calls")
        stats = collect_stats(self.denoiser, self.layers, calib.calls)
        stage.update()
        return stats, calib.calls, calib.summary()


def _uniform_check_images(run: _Run, t: Timings, given: int | None) -> tuple[int, WorkPlan]:
    for n in [given] if given is not None else [8, 4, 2, 1, 0]:
        work = estimate(None, run.shape(1, False, n), t)
        if given is not None or work.seconds <= run.r.max_minutes * 60:
            return n, work
    return 0, estimate(None, run.shape(1, False, 0), t)


def _check_images(run: _Run, model: nn.Module, n: int) -> dict:
    """A few images, FP and quantized, same seeds: latent SQNR and image PSNR."""
    if n <= 0:
        return {}
    stage = run.progress.stage("check images", 2, "sampling")
    conditions = run.r.conditions.pick(run.pipe, n, "check")

    def images(pipe):
        return sample(
            pipe,
            conditions,
            seed=SEEDS["check"],
            num_inference_steps=run.r.steps,
            guidance_scale=run.r.guidance,
        )

    fp = images(run.pipe)
    stage.update()
    with denoiser_swapped(run.pipe, model):
        q = images(run.pipe)
    stage.update()
    return {
        "check_images": n,
        "check_conditions": "check",
        "sqnr_latent_db": rounded(sqnr_db(fp.latents, q.latents)),
        "psnr_db": rounded(psnr_db(fp.images, q.images)),
    }


def _prepare(
    pipeline,
    source: str | None,
    recipe: str | Recipe,
    options: QuantizeOptions,
    from_analysis: bool = False,
):
    source = source or _source_of(pipeline)
    steps, guidance = sampling_settings(
        source, options.num_inference_steps, options.guidance_scale, pipeline
    )
    conditions = options.conditions or resolve_conditions(pipeline, source)
    r = resolve(
        options,
        recipe,
        steps=steps,
        guidance=guidance,
        conditions=conditions,
        from_analysis=from_analysis,
    )
    return source, r


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
    source, r = _prepare(pipeline, source, recipe, options)
    with _Run(pipeline, source, r, progress) as run:
        n, work = _uniform_work(run)
        progress.plan(work)
        stats: ActivationStats | None = None
        calibration: dict = {"kind": "none: per-token activations"}
        if r.recipe.static:
            stats, _, calibration = run.calibrate(r.calibration_prompts)
        stage = progress.stage("quantize", 1, "model")
        units = run.units["block"]
        plan = uniform_plan(units, r.recipe)
        model = _quantized_copy(run, stats, specs_of(plan), {})
        stage.update()
        measured = _check_images(run, model, n)
        return Quantized(
            pipeline=_with_denoiser(pipeline, run.attr, model),
            denoiser=model,
            plan=_as_applied(plan, model, run.backend),
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


def _quantized_copy(run: _Run, stats: ActivationStats | None, specs, smoothing) -> nn.Module:
    model = copy.deepcopy(run.denoiser).eval()
    run.backend.quantize_layers(model, specs, ranges_for(stats, specs, smoothing), smoothing)
    return model


def _by_plan(pipeline, plan: dict[str, LayerPlan], options, source, progress, start) -> Quantized:
    if not plan:
        raise ValueError("an empty plan quantizes nothing")
    grain = {lp.spec.granularity for lp in plan.values()} - {None}
    backend = options.backend or ("torchao" if "token" in grain else "quanto")
    base = get_recipe("w8a8-static").with_granularity("timestep" if "timestep" in grain else None)
    source, r = _prepare(pipeline, source, base, replace(options, backend=backend))
    with _Run(pipeline, source, r, progress) as run:
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
        model = _quantized_copy(run, stats, specs_of(plan), smoothing)
        measured = _check_images(run, model, 8 if r.check_images is None else r.check_images)
        return Quantized(
            pipeline=_with_denoiser(pipeline, run.attr, model),
            denoiser=model,
            plan=_as_applied(plan, model, run.backend),
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


def _measured_levels(recipe: Recipe) -> list[str]:
    return [lv for lv in recipe.levels if lv != "float"]


def _header(run: _Run, effort: Effort, trajectory: list, calibration: dict) -> dict:
    r = run.r
    return {
        "source": run.source,
        "recipe": r.recipe.name,
        "granularity": r.recipe.granularity,
        "backend": r.backend,
        "unit": effort.unit,
        "scope": effort.scope,
        "guided": r.guided and run.guided,
        "prompts": effort.prompts,
        "recorded_steps": effort.recorded_steps,
        "steps": r.steps,
        "guidance": r.guidance,
        "conditions": [str(c) if not isinstance(c, int) else c for c in trajectory],
        # what was calibrated, not how long it took: a resumed run compares this header
        "calibration": {k: v for k, v in calibration.items() if k != "record_seconds"},
        "smoothing": r.smoothing,
        "time_protection": r.time_protection,
        "dtype": _dtype_name(run.denoiser),
    }


def _memory_for_recording() -> int | None:
    """Half the memory available now: the recording shares it with the model, its copies and
    the sampler (Linux; elsewhere unbounded)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        return None
    return None


def _planned_work(run: _Run) -> tuple[WorkPlan, Shape]:
    """Probe, then the most thorough effort that fits the time budget."""
    r = run.r
    levels = _measured_levels(r.recipe)
    spec_at = {
        lv: (lambda layer, lv=lv: level_spec(lv, r.recipe.group_size, r.recipe.granularity))
        for lv in levels
    }
    timings = run._timings = run.timings(spec_at)
    shape = run.shape(len(levels), True, 0)
    work, _ = choose_effort(shape, timings, r.max_minutes, r.forced, _memory_for_recording())
    return work, shape


def _uniform_work(run: _Run) -> tuple[int, WorkPlan]:
    """Probe, then as many check images as fit the time budget (or as given)."""
    base = run.r.recipe.base_spec()
    timings = run._timings = run.timings({base.level: lambda layer: base})
    return _uniform_check_images(run, timings, run.r.check_images)


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
    source, resolved = _prepare(pipeline, source, r, options)
    with _Run(pipeline, source, resolved, progress) as run:
        return _planned_work(run)[0] if r.mixed_precision else _uniform_work(run)[1]


def _analyzed(
    pipeline, recipe: Recipe, options: QuantizeOptions, source, progress, start
) -> Quantized:
    """The SQNR-driven recipes: probe, plan of work, calibrate, record, measure, check."""
    source, r = _prepare(pipeline, source, recipe, options)
    with _Run(pipeline, source, r, progress) as run:
        work, shape = _planned_work(run)
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

        header = _header(run, effort, trajectory, calibration)
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
        )
        budget = _budget(table, r)
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
            pipeline=_with_denoiser(pipeline, run.attr, model),
            denoiser=model,
            plan=_as_applied(checked.plan, model, run.backend),
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
            table=table,
            _fp=pipeline,
            _saved={"stats": stats, "treatments": treatments, "latents": recording.latents},
        )


def _budget(table: SensitivityTable, r: Resolved) -> int | None:
    base = table.base_layer_bytes() + table.fixed_bytes
    budget = r.budget_bytes
    if budget is None and r.budget_ratio is not None:
        budget = int(base * r.budget_ratio)
    if budget is not None and budget < base:
        raise ValueError(
            f"budget of {budget} bytes is below the {base} bytes the base recipe already makes "
            f"the denoiser ({table.fixed_bytes} of them stay float whatever the plan)"
        )
    return budget


def _detail(
    measurer: Measurer,
    run: _Run,
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
    source, r = _prepare(pipeline, source, recipe, options, from_analysis=True)
    if r.backend != on["backend"]:
        raise ValueError(f"the analysis was measured on {on['backend']}, not {r.backend}")
    with _Run(pipeline, source, r, progress) as run:
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
            choice = choose(table, r.target_sqnr_db, _budget(table, r))
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
        plan = plan_at_levels(units, choice.levels, recipe, treatments)
        stage = progress.stage("quantize", 1, "model")
        model = _quantized_copy(run, saved["stats"], specs_of(plan), treatments.scales(plan))
        stage.update()
        measured: dict = {
            "predicted_sqnr_db": rounded(choice.predicted_sqnr_db),
            "frontier_point": k if on_path else None,
        }
        seconds_left = r.max_minutes * 60 - (time.perf_counter() - start)
        fp_latents = saved["latents"]
        per_sampling = on.get("sampling_seconds")
        if fp_latents is not None and (per_sampling is None or per_sampling < seconds_left):
            stage = progress.stage("check", 1, "sampling")
            conditions = list(on["conditions"])
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
            progress.note("end-to-end check skipped: it does not fit --max-minutes")
        return Quantized(
            pipeline=_with_denoiser(pipeline, run.attr, model),
            denoiser=model,
            plan=_as_applied(plan, model, run.backend),
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
            _fp=pipeline,
        )


def _finite_or_inf(x: float | None) -> float:
    return math.inf if x is None else x
