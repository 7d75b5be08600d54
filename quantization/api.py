"""The package's one in-memory API: quantize a pipeline by a recipe or a plan; load an artifact.

    from quantization import Settings, load_quantized, open_source, quantize

    pipe = open_source("models/dit-digits")
    result = quantize(pipe, "w8a8", source="models/dit-digits")
    result.pipeline      # the source's components with the quantized denoiser
    result.plan          # {layer: LayerPlan}
    result.analysis      # Analysis (SQNR-driven recipes), else None
    result.measured      # denoiser SQNR on the trajectory; latent SQNR and PSNR of check images
    result.save("artifacts/dit-digits-w8a8")
    again = load_quantized("artifacts/dit-digits-w8a8")

The CLI, the worker, bench and the tests all go through here.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipelines.generate import guided_prediction, sample
from pipelines.loader import DEFAULTS_FILE, sampling_settings
from quality.metrics import psnr_db, sqnr_db
from quantization.artifact import DTYPES, load_quantized, open_source, save_artifact
from quantization.blocks import denoiser_attr, denoiser_swapped
from quantization.calibration import (
    SEEDS,
    Calibration,
    Conditions,
    record_calibration,
    record_trajectory,
    resolve_conditions,
    trajectory_sampler,
)
from quantization.plan import LayerPlan
from quantization.ptq import analyze, timesteps_of
from quantization.ptq import quantize_denoiser as _quantize_denoiser
from quantization.report import write_report
from quantization.sensitivity import Measurer
from quantization.types import RECIPES, Recipe, get_recipe

__all__ = [
    "Analysis",
    "Result",
    "Settings",
    "analyze_pipeline",
    "load_quantized",
    "open_source",
    "quantize",
    "vs_step_series",
]


@dataclass(frozen=True)
class Settings:
    """How to calibrate, measure and plan, beyond the recipe. ``None``: the default named."""

    backend: str | None = None  # None: the recipe's default backend
    granularity: str | None = None  # None: the recipe's (types.GRANULARITIES)
    calibration: str = "single-step"  # granularity "timestep" always calibrates multi-step
    calibration_steps: int | None = None  # multi-step: K steps spread (None: every step)
    calibration_prompts: int = 32
    trajectory_prompts: int | None = None  # None: the recipe's
    conditions: Conditions | None = None  # None: the digits data (embedded models only)
    num_inference_steps: int | None = None  # None: the folder's / the pipeline's default
    guidance_scale: float | None = None
    target_sqnr_db: float | None = None  # None: the recipe's
    budget_ratio: float | None = None  # None: the recipe's
    budget_bytes: int | None = None
    smoothing: bool = True
    time_protection: bool = True
    scope: str | None = None  # where relative SQNR is measured (ptq.SCOPES); None: the recipe's
    guided: bool = False  # measure on the guided noise, not both branches' raw outputs
    check_images: int = 8  # FP vs quantized images for the end-to-end numbers; 0: none


@dataclass(frozen=True)
class Analysis:
    """What the SQNR-driven planning found; ``raw`` is the whole JSON (sensitivity.json)."""

    block_levels: dict[str, str]
    predicted_sqnr_db: float | None
    plan_sqnr_db: float | None
    uniform_base_sqnr_db: float | None
    worst_blocks: list[str]
    time_sensitive_layers: list[str]
    smoothed_layers: list[str]
    treatment_gains: dict[str, float | None]
    raw: dict = field(repr=False)

    @classmethod
    def of(cls, a: dict) -> Analysis:
        return cls(
            block_levels=a["global"]["block_levels"],
            predicted_sqnr_db=a["global"]["predicted_sqnr_db"],
            plan_sqnr_db=a["measured"]["plan_sqnr_db"],
            uniform_base_sqnr_db=a["measured"]["uniform_base_sqnr_db"],
            worst_blocks=a["worst_blocks"],
            time_sensitive_layers=a["time_sensitive"]["layers"],
            smoothed_layers=sorted(a["smoothing"]),
            treatment_gains=a["treatment_gains"],
            raw=a,
        )

    def summary(self) -> dict:
        return {
            "worst_blocks": self.worst_blocks,
            "block_levels": self.block_levels,
            "predicted_sqnr_db": self.predicted_sqnr_db,
            "time_sensitive_layers": self.time_sensitive_layers,
            "smoothed_layers": self.smoothed_layers,
            "treatment_gains": self.treatment_gains,
        }


@dataclass
class Result:
    """A quantized pipeline and how it was made and measured; ``save`` writes the artifact."""

    pipeline: object
    denoiser: torch.nn.Module
    plan: dict[str, LayerPlan]
    backend: str
    recipe: Recipe | None  # None: quantized by a given plan
    analysis: Analysis | None
    calibration: dict
    sampling: dict
    measured: dict
    source: str
    seconds: float
    trajectory_series: dict = field(default_factory=dict, repr=False)
    plan_origin: str = "a given plan"  # what the manifest says of a plan's provenance
    _fp: object = field(default=None, repr=False)

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
        }

    def save(self, out: str | Path) -> dict:
        """Write the artifact folder (weights, plan, manifest, report); returns the manifest."""
        out = Path(out)
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
        raw = None if self.analysis is None else self.analysis.raw
        if raw is not None:
            (out / "sensitivity.json").write_text(json.dumps(raw, indent=1) + "\n")
        (out / "report.md").write_text(write_report(out, written, raw, self.trajectory_series))
        return written


def _dtype_name(module: torch.nn.Module) -> str:
    names = {dtype: name for name, dtype in DTYPES.items()}
    floats = [p.dtype for p in module.parameters() if p.dtype in names]
    floats += [b.dtype for b in module.buffers() if b.dtype in names]
    return names[floats[0]] if floats else "fp32"


def _source_of(pipe) -> str:
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", ""))


@dataclass
class _Prepared:
    attr: str
    steps: int
    guidance: float
    conditions: Conditions
    calibration: Calibration
    measurer: Measurer


def _prepare(pipe, source: str, s: Settings, recipe: Recipe, backend: str, progress) -> _Prepared:
    attr = denoiser_attr(pipe)
    steps, guidance = sampling_settings(source, s.num_inference_steps, s.guidance_scale, pipe)
    conditions = s.conditions or resolve_conditions(pipe, source)
    # scales per timestep range are calibrated on steps across the schedule
    kind = "multi-step" if recipe.granularity == "timestep" else s.calibration
    progress(f"calibration: {kind}, {s.calibration_prompts} conditions")
    calib = record_calibration(
        pipe,
        attr,
        conditions.pick(pipe, s.calibration_prompts, "calibration"),
        kind=kind,
        k=s.calibration_steps,
        num_inference_steps=steps,
        guidance_scale=guidance,
    )
    n = recipe.trajectory_prompts if s.trajectory_prompts is None else s.trajectory_prompts
    progress(f"FP trajectory of {n} conditions to measure on")
    measured_on = conditions.pick(pipe, n, "trajectory")
    traj = record_trajectory(
        pipe, attr, measured_on, num_inference_steps=steps, guidance_scale=guidance
    )
    sampler = trajectory_sampler(
        pipe, measured_on, num_inference_steps=steps, guidance_scale=guidance
    )
    guide = guided_prediction(pipe, guidance) if s.guided else None
    measurer = Measurer(
        getattr(pipe, attr), calib.calls, traj.calls, backend, sampler, traj.latents, guide
    )
    return _Prepared(attr, steps, guidance, conditions, calib, measurer)


def _recipe_and_backend(recipe: str | Recipe, s: Settings) -> tuple[Recipe, str]:
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    r = r.with_granularity(s.granularity)
    return r, s.backend or r.backend


def _analyze(prep: _Prepared, recipe: Recipe, s: Settings, progress):
    return analyze(
        prep.measurer,
        recipe,
        target_sqnr_db=recipe.target_sqnr_db if s.target_sqnr_db is None else s.target_sqnr_db,
        budget_ratio=recipe.budget_ratio if s.budget_ratio is None else s.budget_ratio,
        budget_bytes=s.budget_bytes,
        smoothing_on=s.smoothing and recipe.smoothing,
        time_protection_on=s.time_protection and recipe.protect_time_sensitive,
        scope=s.scope or recipe.scope,
        progress=progress,
    )


def quantize(
    pipeline,
    recipe_or_plan: str | Recipe | dict[str, LayerPlan],
    *,
    settings: Settings = Settings(),
    source: str | None = None,
    progress=lambda message: None,
) -> Result:
    """Quantize ``pipeline``'s denoiser by a recipe (its name or a Recipe) or a plan.

    The FP pipeline is left as it was. ``source`` names the folder or hub id it came from
    (default: the pipeline's own ``name_or_path``): its defaults.json gives the sampling
    settings, and an embedded model's digits data the calibration conditions.
    """
    start = time.perf_counter()
    source = source or _source_of(pipeline)
    by_plan = isinstance(recipe_or_plan, dict)
    if by_plan:
        if not recipe_or_plan:
            raise ValueError("an empty plan quantizes nothing")
        grain = {lp.spec.granularity for lp in recipe_or_plan.values()} - {None}
        recipe, backend = None, settings.backend or ("torchao" if "token" in grain else "quanto")
        base = get_recipe("w8a8-static").with_granularity(
            "timestep" if "timestep" in grain else None
        )
    else:
        recipe, backend = _recipe_and_backend(recipe_or_plan, settings)
        base = recipe
    progress(f"loading calibration data ({backend})")
    prep = _prepare(pipeline, source, settings, base, backend, progress)
    analysis = None
    if by_plan:
        progress("quantizing by the given plan")
        done = _quantize_denoiser(
            prep.measurer.denoiser,
            base,
            prep.calibration.calls,
            plan=recipe_or_plan,
            backend=backend,
        )
    elif recipe.mixed_precision:
        done = _analyze(prep, recipe, settings, progress)
        analysis = Analysis.of(done.analysis)
    else:
        progress(f"quantizing: {recipe.name}")
        done = _quantize_denoiser(
            prep.measurer.denoiser, recipe, prep.calibration.calls, backend=backend
        )
    progress("measuring: denoiser SQNR on the trajectory, images against FP")
    variant = prep.measurer.measure(done.model, layers=list(done.plan))
    measured = {
        "denoiser_sqnr_db": _finite(variant.sqnr_db),
        **_end_to_end(pipeline, prep, done.model, settings.check_images),
    }
    if analysis is not None:
        series = vs_step_series(analysis.raw)
    else:
        label = recipe.name if recipe is not None else "plan"
        series = {
            "timesteps": timesteps_of(prep.measurer.trajectory),
            "series": {label: [_finite(x) for x in variant.sqnr_by_step.values()]},
        }
    return Result(
        pipeline=_with_denoiser(pipeline, prep.attr, done.model),
        denoiser=done.model,
        plan=done.plan,
        backend=backend,
        recipe=recipe,
        analysis=analysis,
        calibration={
            **prep.calibration.summary(),
            "conditions": prep.conditions.summary(),
            "quantize_seconds": round(done.seconds, 3),
        },
        sampling={"num_inference_steps": prep.steps, "guidance_scale": prep.guidance},
        measured=measured,
        source=str(source),
        seconds=time.perf_counter() - start,
        trajectory_series=series,
        _fp=pipeline,
    )


def analyze_pipeline(
    pipeline,
    recipe: str | Recipe = "w4a8-sqnr",
    *,
    settings: Settings = Settings(),
    source: str | None = None,
    progress=lambda message: None,
) -> tuple[Analysis, dict[str, LayerPlan], dict]:
    """The sensitivity analysis of an SQNR-driven recipe, without measuring end to end:
    (analysis, plan, the manifest-like summary report.md is written from)."""
    source = source or _source_of(pipeline)
    r, backend = _recipe_and_backend(recipe, settings)
    if not r.mixed_precision:
        mixed = [x.name for x in RECIPES.values() if x.mixed_precision]
        raise ValueError(
            f"analyze studies an SQNR-driven recipe ({', '.join(mixed)}), not {r.name}"
        )
    prep = _prepare(pipeline, source, settings, r, backend, progress)
    done = _analyze(prep, r, settings, progress)
    summary = {
        "source": str(source),
        "backend": backend,
        "recipe": asdict(r),
        "calibration": {**prep.calibration.summary(), "quantize_seconds": done.seconds},
        "measured": done.analysis["measured"],
        "sizes": {"plan_layer_bytes": done.analysis["measured"]["plan_layer_bytes"]},
    }
    return Analysis.of(done.analysis), done.plan, summary


def vs_step_series(analysis: dict) -> dict:
    s = analysis["sqnr_vs_step"]
    return {
        "timesteps": s["timesteps"],
        "series": {
            k: v
            for k, v in (
                ("uniform base", s["uniform_base"]),
                ("base + local treatments", s["base_with_treatments"]),
                ("plan", s["plan"]),
            )
            if v is not None
        },
    }


def _with_denoiser(pipe, attr: str, denoiser: torch.nn.Module):
    """A pipeline sharing ``pipe``'s other components, with ``denoiser`` in place."""
    new = copy.copy(pipe)
    new.register_modules(**{attr: denoiser})
    return new


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 3)


@torch.no_grad()
def _end_to_end(pipe, prep: _Prepared, quantized, n: int) -> dict:
    """A few images, FP and quantized, same seeds: latent SQNR and image PSNR for the manifest."""
    if n <= 0:
        return {}
    conditions = prep.conditions.pick(pipe, n, "check")
    kw = {
        "seed": SEEDS["check"],
        "num_inference_steps": prep.steps,
        "guidance_scale": prep.guidance,
    }
    fp = sample(pipe, conditions, **kw)
    with denoiser_swapped(pipe, quantized):
        q = sample(pipe, conditions, **kw)
    return {
        "check_images": n,
        "sqnr_latent_db": _finite(sqnr_db(fp.latents, q.latents)),
        "psnr_db": _finite(psnr_db(fp.images, q.images)),
    }
