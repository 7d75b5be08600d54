"""python -m quantization analyze | quantize | evaluate  (see --help of each)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quantization.types import BACKENDS, DTYPES, GRANULARITIES, RECIPES

RECIPE_HELP = "recipes (default backend):\n" + "\n".join(
    f"  {r.name:<11} ({r.backend}) {r.summary}" for r in RECIPES.values()
)

DESCRIPTION = """\
Post-training quantization of a diffusers pipeline's denoiser (DiT, PixArt, SD UNet), driven by
SQNR. SRC is a local pipeline folder (e.g. models/dit-digits) or a hub id (read from the local
cache; nothing is downloaded when HF_HUB_OFFLINE=1). The embedded models calibrate on their
digits data; any other model needs --prompts FILE (text-to-image) or --classes (DiT).

  analyze SRC                       sensitivity report: relative / accumulated SQNR per block,
                                    per-layer SQNR in the worst blocks, SQNR against t
  quantize SRC --recipe R --out DIR quantized pipeline folder (or --plan plan.json)
  evaluate SRC [ARTIFACT ...]       FP and each artifact with the same seeds: latent SQNR,
                                    PSNR, SSIM, prompt accuracy, FD, bytes, latency, memory
"""


class Stages:
    """A progress bar over the named stages of a command, on stderr."""

    def __init__(self, total: int, title: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=title, file=sys.stderr, leave=True, dynamic_ncols=True)
        self.started = False

    def __call__(self, message: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(message[:70])

    def close(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="pipeline folder or hub id")
    p.add_argument(
        "--steps",
        type=int,
        help="sampling steps (default: the folder's defaults.json, else the pipeline's own)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="guidance scale (default: the folder's defaults.json, else the pipeline's own)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="text-to-image: calibrate and measure on these prompts (one per line)",
    )
    what.add_argument(
        "--classes",
        metavar="IDS",
        help="class-conditional (DiT): class ids to calibrate and measure on, 1,207,360 or all",
    )


def _calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration",
        choices=("single-step", "multi-step"),
        default="single-step",
        help="record activation ranges at the first step only (default) or along the trajectory",
    )
    p.add_argument(
        "--calibration-steps",
        type=int,
        metavar="K",
        help="multi-step: K steps spread over the schedule (default: every step)",
    )
    p.add_argument(
        "--calibration-prompts",
        type=int,
        default=32,
        help="calibration prompts / labels (default 32)",
    )
    p.add_argument(
        "--trajectory-prompts",
        type=int,
        help="prompts whose full FP trajectory SQNR is measured on (default: the recipe's, 8 "
        "or 32)",
    )
    p.add_argument(
        "--target-sqnr",
        type=float,
        help="SQNR-driven recipes: predicted SQNR to reach, dB (at the denoiser output, or of "
        "the final latents for scope end-to-end; default: the recipe's)",
    )
    p.add_argument(
        "--budget-ratio",
        type=float,
        help="SQNR-driven recipes: the denoiser weighs at most this many times what the base "
        "recipe makes it weigh (default: the recipe's, 1.2 or 1.08)",
    )
    p.add_argument(
        "--budget-bytes",
        type=int,
        help="SQNR-driven recipes: the denoiser weighs at most this many bytes (overrides "
        "--budget-ratio)",
    )
    p.add_argument("--no-smoothing", action="store_true", help="w4a8-sqnr: switch SmoothQuant off")
    p.add_argument(
        "--no-time-protection",
        action="store_true",
        help="w4a8-sqnr: quantize the activations of time-sensitive layers too",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="quanto (static per-tensor activations, int4 packed) or torchao (per-token "
        "dynamic or static int8, fast compiled); default: the recipe's, listed below",
    )
    p.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        help="activation scales: tensor (one static scale per layer, calibrated), timestep "
        "(static, one scale per range of the schedule, calibrated on every step; quanto) or "
        "token (dynamic, torchao); default: the recipe's",
    )
    p.add_argument(
        "--scope",
        choices=("denoiser", "block", "end-to-end"),
        help="SQNR-driven recipes: measure a unit's relative SQNR at the denoiser output, at "
        "its own output run alone (fast, for full-size models), or on the final latents of "
        "sampling (default: the recipe's)",
    )
    p.add_argument(
        "--guided",
        action="store_true",
        help="scopes denoiser and block: compare the guided noise the sampler uses, "
        "uncond + g (cond - uncond), rather than the raw output of both branches",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="dtype the denoiser is quantized in (float parts keep it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quantization",
        description=DESCRIPTION,
        epilog=RECIPE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    a = sub.add_parser(
        "analyze", help="sensitivity report", epilog=RECIPE_HELP, formatter_class=fmt
    )
    _common(a)
    _calibration_args(a)
    a.add_argument(
        "--recipe", default="w4a8-sqnr", help="base recipe of the analysis (default w4a8-sqnr)"
    )
    a.add_argument(
        "--out", type=Path, required=True, help="folder for sensitivity.json, report.md and plots"
    )

    q = sub.add_parser(
        "quantize", help="write a quantized artifact", epilog=RECIPE_HELP, formatter_class=fmt
    )
    _common(q)
    _calibration_args(q)
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--recipe", help="one of the recipes below")
    how.add_argument(
        "--plan", type=Path, help="a plan.json (e.g. edited from an artifact) instead of a recipe"
    )
    q.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    q.add_argument(
        "--check-images",
        type=int,
        default=8,
        help="images sampled FP vs quantized for the manifest's end-to-end numbers (default 8)",
    )

    e = sub.add_parser("evaluate", help="compare FP and artifacts, same seeds")
    _common(e)
    e.add_argument("artifacts", nargs="*", type=Path, help="artifact folders")
    e.add_argument(
        "--json", type=Path, required=True, dest="json_out", help="where to write the results"
    )
    e.add_argument("--n", type=int, default=64, help="images per variant (default 64)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=16)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from quantization.artifact import ArtifactError

    try:
        if args.command == "evaluate":
            return _evaluate(args)
        return _quantize_or_analyze(args)
    except (ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _evaluate(args) -> int:
    from quantization.evaluate import EvalSettings, evaluate

    for a in args.artifacts:
        if not (a / "manifest.json").is_file():
            raise ValueError(f"{a} is not an artifact folder (no manifest.json)")
    settings = EvalSettings(
        args.n,
        args.seed,
        args.steps,
        args.guidance,
        args.batch_size,
        prompts=None if args.prompts is None else str(args.prompts),
        classes=args.classes,
    )
    result = evaluate(
        args.src,
        [str(a) for a in args.artifacts],
        settings,
        progress=lambda m: print(m, file=sys.stderr),
    )
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["variants"]:
        print(json.dumps(row))
    return 0


def stage_count(args) -> int:
    from quantization.types import get_recipe

    mixed = args.command == "analyze" or (
        getattr(args, "recipe", None) and get_recipe(args.recipe).mixed_precision
    )
    return 4 + (6 if mixed else 1) + (1 if args.command == "quantize" else 0)


def settings_from_args(args, pipe):
    from quantization.api import Settings
    from quantization.calibration import resolve_conditions

    return Settings(
        backend=args.backend,
        granularity=args.granularity,
        calibration=args.calibration,
        calibration_steps=args.calibration_steps,
        calibration_prompts=args.calibration_prompts,
        trajectory_prompts=args.trajectory_prompts,
        conditions=resolve_conditions(pipe, args.src, args.prompts, args.classes),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        target_sqnr_db=args.target_sqnr,
        budget_ratio=args.budget_ratio,
        budget_bytes=args.budget_bytes,
        smoothing=not args.no_smoothing,
        time_protection=not args.no_time_protection,
        scope=args.scope,
        guided=args.guided,
        check_images=getattr(args, "check_images", 8),
    )


def _quantize_or_analyze(args) -> int:
    from quantization.artifact import DTYPES as TORCH_DTYPES
    from quantization.artifact import open_source

    if args.command == "quantize" and args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} exists and is not empty; choose a new --out")
    stages = Stages(stage_count(args), f"{args.command} {args.src}")
    start = time.perf_counter()
    try:
        stages("loading the FP pipeline")
        pipe = open_source(args.src, torch_dtype=TORCH_DTYPES[args.dtype])
        settings = settings_from_args(args, pipe)
        if args.command == "analyze":
            summary = _analyze(args, pipe, settings, stages)
        else:
            summary = _quantize(args, pipe, settings, stages)
    finally:
        stages.close()
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 1)}, indent=1))
    return 0


def _analyze(args, pipe, settings, progress) -> dict:
    """sensitivity.json, plan.json and report.md with plots, into --out."""
    from quantization.api import analyze_pipeline, vs_step_series
    from quantization.plan import plan_to_json
    from quantization.report import write_report

    analysis, plan, summary = analyze_pipeline(
        pipe, args.recipe, settings=settings, source=args.src, progress=progress
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(analysis.raw, indent=1) + "\n")
    (out / "plan.json").write_text(json.dumps(plan_to_json(plan), indent=1) + "\n")
    series = vs_step_series(analysis.raw)
    (out / "report.md").write_text(write_report(out, summary, analysis.raw, series))
    return {"out": str(out), **analysis.raw["measured"]}


def _quantize(args, pipe, settings, progress) -> dict:
    from quantization.api import quantize
    from quantization.plan import plan_from_json

    how = args.recipe if args.plan is None else plan_from_json(json.loads(args.plan.read_text()))
    result = quantize(pipe, how, settings=settings, source=args.src, progress=progress)
    result.plan_origin = f"plan from {args.plan}"
    progress(f"writing {args.out}")
    manifest = result.save(args.out)
    return {"out": str(args.out), "backend": result.backend, **result.measured, **manifest["sizes"]}
