"""One quantization or analysis of one pipeline: the settings resolved, the denoiser and its
units, the probe's timings and the plan of work, the calibration pass and the end-to-end check
images; the stages ``quantization.api`` runs in order go through a ``Run``."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pipelines.generate import decode, final_latents, sample, vae_latents
from pipelines.loader import sampling_settings
from quality.metrics import psnr_db, sqnr_db
from quantization import backends
from quantization.activations import ActivationStats, collect_stats, ranges_for
from quantization.analysis import (
    check_levels,
    find_units,
    fp_bytes,
)
from quantization.artifact import (
    DTYPES,
)
from quantization.blocks import denoiser_attr, denoiser_swapped
from quantization.calibration import SEEDS, record_calibration, resolve_conditions
from quantization.cost import (
    Effort,
    Shape,
    Timings,
    WorkPlan,
    cheapest_within,
    choose_effort,
    estimate,
)
from quantization.options import QuantizeOptions, Resolved, resolve
from quantization.plan import LayerPlan
from quantization.probe import probe
from quantization.progress import Progress
from quantization.report import rounded
from quantization.table import SensitivityTable
from quantization.types import Recipe, level_spec

__all__ = [
    "Run",
    "as_applied",
    "budget_bytes_of",
    "dtype_name",
    "journal_header",
    "measured_levels",
    "memory_for_recording",
    "planned_work",
    "prepare",
    "quantized_copy",
    "sample_check_images",
    "source_of",
    "uniform_check_images",
    "uniform_work",
    "with_denoiser",
]


def dtype_name(module: nn.Module) -> str:
    names = {dtype: name for name, dtype in DTYPES.items()}
    floats = [p.dtype for p in module.parameters() if p.dtype in names]
    floats += [b.dtype for b in module.buffers() if b.dtype in names]
    return names[floats[0]] if floats else "fp32"


def source_of(pipe) -> str:
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", ""))


def with_denoiser(pipe, attr: str, denoiser: nn.Module):
    """A pipeline sharing ``pipe``'s other components, with ``denoiser`` in place."""
    new = copy.copy(pipe)
    new.register_modules(**{attr: denoiser})
    return new


def as_applied(plan: dict[str, LayerPlan], model: nn.Module, backend) -> dict[str, LayerPlan]:
    """The plan with the group sizes the layers really got (a group wider than a row: per row)."""
    applied = backend.layer_specs(model)
    return {n: replace(lp, group_size=applied[n].group_size) for n, lp in plan.items()}


class Run:
    """One quantization or analysis of one pipeline: resolved settings, the denoiser, its
    units, the probe's timings, and the stages in the order they run."""

    def __init__(self, pipe, source: str, r: Resolved, progress: Progress) -> None:
        self.pipe, self.source, self.r, self.progress = pipe, source, r, progress
        self.attr = denoiser_attr(pipe)
        self.denoiser: nn.Module = getattr(pipe, self.attr).eval()
        self.backend = backends.get(r.backend)
        check_levels(self.backend, r.recipe, str(next(self.denoiser.parameters()).device))
        self.units = {
            k: find_units(self.denoiser, self.backend.LAYERS, k) for k in ("block", "module")
        }
        self.layers = [layer for u in self.units["block"] for layer in u.layers]
        if not self.layers:
            raise ValueError(f"{source}: no layer the {r.backend} backend quantizes")
        self.guided = r.guidance > 1.0
        self._handles: list = []
        self._timings: Timings | None = None

    def __enter__(self) -> Run:
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
            # the denoiser's input made a VAE latent (Flux's are packed in 2x2 patches)
            lambda z: decode(self.pipe, vae_latents(self.pipe, z)),
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
            smoothing=self.r.smoothing,
            planned=planned,
            denoiser_gb=fp_bytes(self.denoiser, self.layers) / 1e9,
            check_images=check_images,
            timed_shapes=len(
                {
                    (type(m).__name__, tuple(m.get_parameter("weight").shape))
                    for m in (self.denoiser.get_submodule(n) for n in self.layers)
                }
            )
            if planned and self.r.recipe.latency_cost
            else 0,
            layers=len(self.layers),
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


def uniform_check_images(run: Run, t: Timings, given: int | None) -> tuple[int, WorkPlan]:
    for n in [given] if given is not None else [8, 4, 2, 1, 0]:
        work = estimate(None, run.shape(1, False, n), t)
        if given is not None or work.seconds <= run.r.max_minutes * 60:
            return n, work
    return 0, estimate(None, run.shape(1, False, 0), t)


def sample_check_images(run: Run, model: nn.Module, n: int) -> dict:
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


def prepare(
    pipeline,
    source: str | None,
    recipe: str | Recipe,
    options: QuantizeOptions,
    from_analysis: bool = False,
):
    source = source or source_of(pipeline)
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


def quantized_copy(run: Run, stats: ActivationStats | None, specs, smoothing) -> nn.Module:
    model = copy.deepcopy(run.denoiser).eval()
    run.backend.quantize_layers(model, specs, ranges_for(stats, specs, smoothing), smoothing)
    return model


def measured_levels(recipe: Recipe) -> list[str]:
    return [lv for lv in recipe.levels if lv != "float"]


def journal_header(run: Run, effort: Effort, trajectory: list, calibration: dict) -> dict:
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
        "dtype": dtype_name(run.denoiser),
    }


def memory_for_recording() -> int | None:
    """Half the memory available now: the recording shares it with the model, its copies and
    the sampler (Linux; elsewhere unbounded)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        return None
    return None


DEFAULT_OVERRUN = 2.0  # how far past the default budget the cheapest effort may go


def planned_work(run: Run) -> tuple[WorkPlan, Shape]:
    """Probe, then the most thorough effort that fits the time budget."""
    r = run.r
    levels = measured_levels(r.recipe)
    spec_at = {
        lv: (lambda layer, lv=lv: level_spec(lv, r.recipe.group_size, r.recipe.granularity))
        for lv in levels
    }
    timings = run._timings = run.timings(spec_at)
    shape = run.shape(len(levels), True, 0)
    memory = memory_for_recording()
    try:
        work, _ = choose_effort(shape, timings, r.max_minutes, r.forced, memory)
    except ValueError:
        if r.max_minutes_given:
            raise
        # the default budget is a preference, not a refusal line: the cheapest effort, if it
        # stays within twice it, said out loud (a --max-minutes of the user's refuses instead)
        cheapest = cheapest_within(shape, timings, DEFAULT_OVERRUN * r.max_minutes, r.forced)
        if cheapest is None:
            raise
        work = cheapest
        run.progress.note(
            f"no effort fits the default {r.max_minutes:g} minutes; taking the cheapest, "
            f"estimated at {work.seconds / 60:.0f} minutes (--max-minutes M refuses instead)"
        )
    return work, shape


def uniform_work(run: Run) -> tuple[int, WorkPlan]:
    """Probe, then as many check images as fit the time budget (or as given)."""
    base = run.r.recipe.base_spec()
    timings = run._timings = run.timings({base.level: lambda layer: base})
    return uniform_check_images(run, timings, run.r.check_images)


def budget_bytes_of(table: SensitivityTable, r: Resolved) -> int | None:
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
