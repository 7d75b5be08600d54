"""The commands behind the CLI, callable from Python: analyze a source, quantize it to an artifact.

result = quantize_source("models/dit-digits", Options(recipe="w8a8"), out=Path("artifacts/x"))
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.generate import sample
from models.loader import DEFAULTS_FILE, sampling_settings
from quality.metrics import psnr_db, sqnr_db
from quantization.artifact import DTYPES, open_source, save_artifact
from quantization.blocks import denoiser_attr, denoiser_swapped
from quantization.calibration import (
    TRAJECTORY_SEED,
    calibration_conditions,
    record_calibration,
    record_trajectory,
)
from quantization.plan import plan_from_json, plan_to_json
from quantization.ptq import (
    DEFAULT_BUDGET_RATIO,
    DEFAULT_TARGET_SQNR_DB,
    analyze,
    quantize_denoiser,
    timesteps_of,
)
from quantization.recipes import RECIPES, get_recipe
from quantization.report import write_report
from quantization.sensitivity import Measurer

__all__ = ["Options", "analyze_source", "quantize_source", "run", "stage_count"]


@dataclass(frozen=True)
class Options:
    recipe: str = "w8a8"
    plan: Path | None = None
    calibration: str = "single-step"
    calibration_steps: int | None = None
    calibration_prompts: int = 32
    trajectory_prompts: int = 8
    target_sqnr: float | None = None
    budget_ratio: float | None = None
    budget_bytes: int | None = None
    smoothing: bool = True
    time_protection: bool = True
    dtype: str = "float32"
    steps: int | None = None
    guidance: float | None = None
    check_images: int = 8


def _prepare(src: str, o: Options, progress):
    progress("loading the FP pipeline")
    pipe = open_source(src, torch_dtype=DTYPES[o.dtype])
    attr = denoiser_attr(pipe)
    steps, guidance = sampling_settings(src, o.steps, o.guidance)
    progress(f"calibration: {o.calibration}, {o.calibration_prompts} prompts")
    calib = record_calibration(
        pipe,
        attr,
        calibration_conditions(pipe, o.calibration_prompts),
        kind=o.calibration,
        k=o.calibration_steps,
        num_inference_steps=steps,
        guidance_scale=guidance,
    )
    progress(f"FP trajectory of {o.trajectory_prompts} prompts to measure on")
    traj = record_trajectory(
        pipe, attr, o.trajectory_prompts, num_inference_steps=steps, guidance_scale=guidance
    )
    return (
        pipe,
        attr,
        steps,
        guidance,
        calib,
        Measurer(getattr(pipe, attr), calib.calls, traj.calls),
    )


def _analysis(measurer: Measurer, o: Options, progress):
    recipe = get_recipe(o.recipe)
    return analyze(
        measurer,
        recipe,
        target_sqnr_db=DEFAULT_TARGET_SQNR_DB if o.target_sqnr is None else o.target_sqnr,
        budget_ratio=DEFAULT_BUDGET_RATIO if o.budget_ratio is None else o.budget_ratio,
        budget_bytes=o.budget_bytes,
        smoothing_on=o.smoothing and recipe.smoothing,
        time_protection_on=o.time_protection and recipe.protect_time_sensitive,
        progress=progress,
    )


def analyze_source(src: str, o: Options, out: Path, progress=lambda m: None) -> dict:
    """Write sensitivity.json and report.md with plots for ``o.recipe``'s base into ``out``."""
    if not get_recipe(o.recipe).mixed_precision:
        mixed = [r.name for r in RECIPES.values() if r.mixed_precision]
        raise ValueError(
            f"analyze studies an SQNR-driven recipe ({', '.join(mixed)}), not {o.recipe}"
        )
    *_, calib, measurer = _prepare(src, o, progress)
    result = _analysis(measurer, o, progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(result.analysis, indent=1) + "\n")
    (out / "plan.json").write_text(json.dumps(plan_to_json(result.plan), indent=1) + "\n")
    manifest = {
        "source": str(src),
        "recipe": asdict(get_recipe(o.recipe)),
        "calibration": {**calib.summary(), "quantize_seconds": result.seconds},
        "measured": result.analysis["measured"],
        "sizes": {"plan_layer_bytes": result.analysis["measured"]["plan_layer_bytes"]},
    }
    (out / "report.md").write_text(
        write_report(out, manifest, result.analysis, _vs_step(result.analysis))
    )
    return {"out": str(out), **result.analysis["measured"], "seconds": round(result.seconds, 1)}


def _vs_step(analysis: dict) -> dict:
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


def quantize_source(src: str, o: Options, out: Path, progress=lambda m: None) -> dict:
    """Quantize ``src`` by a recipe or a plan and write the artifact; returns its manifest."""
    recipe = get_recipe(o.recipe)
    pipe, attr, steps, guidance, calib, measurer = _prepare(src, o, progress)
    analysis = None
    if o.plan is not None:
        progress(f"quantizing by {o.plan}")
        result = quantize_denoiser(
            measurer.denoiser,
            recipe,
            calib.calls,
            plan=plan_from_json(json.loads(o.plan.read_text())),
        )
    elif recipe.mixed_precision:
        result = _analysis(measurer, o, progress)
        analysis = result.analysis
    else:
        progress(f"quantizing: {recipe.name}")
        result = quantize_denoiser(measurer.denoiser, recipe, calib.calls)
    progress("measuring: denoiser SQNR on the trajectory, images against FP")
    variant = measurer.measure(result.model, layers=list(result.plan))
    measured = {
        "denoiser_sqnr_db": round(variant.sqnr_db, 3),
        **_end_to_end(pipe, attr, result.model, o, steps, guidance),
    }
    manifest = {
        "source": str(src),
        "recipe": asdict(recipe)
        if o.plan is None
        else {"name": "plan", "summary": f"plan from {o.plan}"},
        "calibration": {**calib.summary(), "quantize_seconds": round(result.seconds, 3)},
        "sampling": {"num_inference_steps": steps, "guidance_scale": guidance},
        "sensitivity": None if analysis is None else _sensitivity_summary(analysis),
        "measured": measured,
    }
    progress(f"writing {out}")
    written = save_artifact(out, pipe, result.model, result.plan, manifest, dtype=o.dtype)
    if Path(src).is_dir() and (Path(src) / DEFAULTS_FILE).is_file():
        (out / DEFAULTS_FILE).write_text((Path(src) / DEFAULTS_FILE).read_text())
    if analysis is not None:
        (out / "sensitivity.json").write_text(json.dumps(analysis, indent=1) + "\n")
        series = _vs_step(analysis)
    else:
        series = {
            "timesteps": timesteps_of(measurer.trajectory),
            "series": {recipe.name: list(variant.sqnr_by_step.values())},
        }
    (out / "report.md").write_text(write_report(out, written, analysis, series))
    return written


def _sensitivity_summary(a: dict) -> dict:
    return {
        "worst_blocks": a["worst_blocks"],
        "block_levels": a["global"]["block_levels"],
        "predicted_sqnr_db": a["global"]["predicted_sqnr_db"],
        "time_sensitive_layers": a["time_sensitive"]["layers"],
        "smoothed_layers": sorted(a["smoothing"]),
        "treatment_gains": a["treatment_gains"],
    }


@torch.no_grad()
def _end_to_end(pipe, attr: str, quantized, o: Options, steps: int, guidance: float) -> dict:
    """A few images, FP and quantized, same seeds: latent SQNR and image PSNR for the manifest."""
    if o.check_images <= 0:
        return {}
    conditions = calibration_conditions(pipe, o.check_images, seed=TRAJECTORY_SEED + 1)
    kw = {"seed": TRAJECTORY_SEED + 1, "num_inference_steps": steps, "guidance_scale": guidance}
    fp = sample(pipe, conditions, **kw)
    with denoiser_swapped(pipe, quantized):
        q = sample(pipe, conditions, **kw)
    return {
        "check_images": o.check_images,
        "sqnr_latent_db": round(sqnr_db(fp.latents, q.latents), 3),
        "psnr_db": round(psnr_db(fp.images, q.images), 3),
    }


def stage_count(args) -> int:
    mixed = args.command == "analyze" or (
        getattr(args, "recipe", None) and get_recipe(args.recipe).mixed_precision
    )
    return 3 + (6 if mixed else 1) + (2 if args.command == "quantize" else 0)


def options_from_args(args) -> Options:
    return Options(
        recipe=getattr(args, "recipe", None) or "w8a8",
        plan=getattr(args, "plan", None),
        calibration=args.calibration,
        calibration_steps=args.calibration_steps,
        calibration_prompts=args.calibration_prompts,
        trajectory_prompts=args.trajectory_prompts,
        target_sqnr=args.target_sqnr,
        budget_ratio=args.budget_ratio,
        budget_bytes=args.budget_bytes,
        smoothing=not args.no_smoothing,
        time_protection=not args.no_time_protection,
        dtype=args.dtype,
        steps=args.steps,
        guidance=args.guidance,
        check_images=getattr(args, "check_images", 8),
    )


def run(args, progress=lambda m: None) -> dict:
    o = options_from_args(args)
    start = time.perf_counter()
    if args.command == "analyze":
        summary = analyze_source(args.src, o, args.out, progress)
    else:
        manifest = quantize_source(args.src, o, args.out, progress)
        summary = {"out": str(args.out), **manifest["measured"], **manifest["sizes"]}
    return {**summary, "wall_seconds": round(time.perf_counter() - start, 1)}
