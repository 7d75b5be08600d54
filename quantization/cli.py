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
    effort = p.add_argument_group(
        "effort (default: the most thorough that fits --max-minutes, chosen from one timed call)"
    )
    effort.add_argument(
        "--max-minutes",
        type=float,
        help="time budget for the whole run (default 20; quantize --analysis: 3); refused, with "
        "what would fit, when nothing does",
    )
    effort.add_argument("--calibration-prompts", type=int, help="calibration prompts / labels")
    effort.add_argument(
        "--trajectory-prompts",
        type=int,
        help="conditions of the recorded FP trajectory that sensitivity and checks measure on",
    )
    effort.add_argument(
        "--recorded-steps", type=int, help="steps of that trajectory recorded, spread over it"
    )
    effort.add_argument(
        "--unit", choices=("module", "block"), help="what the planner gives a level to"
    )
    effort.add_argument(
        "--scope",
        choices=("denoiser", "block"),
        help="a unit's relative SQNR from the recording: at the denoiser output (the blocks "
        "before it replayed) or at its block's output (cheapest)",
    )
    effort.add_argument("--checks", type=int, help="end-to-end samplings of the plan, at most")
    effort.add_argument(
        "--refine", type=int, help="units a check blames, measured end to end, per check"
    )
    effort.add_argument(
        "--detail",
        action=argparse.BooleanOptionalAction,
        help="accumulated SQNR, per-layer SQNR and the treatments' gains",
    )
    p.add_argument(
        "--resume", action="store_true", help="go on from the journal an interrupted run left"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="time one denoiser call, print the plan of work and its estimate, and stop",
    )
    p.add_argument(
        "--target-sqnr",
        type=float,
        help="SQNR-driven recipes: SQNR of the final latents to reach, dB (default: the recipe's)",
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
    p.add_argument(
        "--latency-images",
        type=int,
        help="recipes priced by latency (w8a8-static-sqnr): time each layer at the batch of "
        "this many images per denoiser call (default 1: one request, the latency case)",
    )
    smooth = p.add_mutually_exclusive_group()
    smooth.add_argument(
        "--smoothing",
        action="store_true",
        help="SQNR recipes without it (w8a8, w8a8-static-sqnr): SmoothQuant on the layers whose "
        "input channels are uneven, alpha searched per layer (0.5 / 0.65 / 0.8), kept where "
        "it gains",
    )
    smooth.add_argument(
        "--no-smoothing", action="store_true", help="w4a8-sqnr: switch SmoothQuant off"
    )
    p.add_argument(
        "--no-time-protection",
        action="store_true",
        help="w4a8-sqnr: quantize the activations of time-sensitive layers too",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="quanto (static per-tensor activations, int4 packed), torchao (per-token "
        "dynamic or static int8, fast compiled) or x86 (int8 Linear and Conv2d on oneDNN's "
        "CPU kernels, static or per-token, eager or compiled); default: the recipe's, listed below",
    )
    p.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        help="activation scales: tensor (one static scale per layer, calibrated), timestep "
        "(static, one scale per range of the schedule, calibrated on every step; quanto) or "
        "token (dynamic, torchao); default: the recipe's",
    )
    p.add_argument(
        "--raw-outputs",
        action="store_true",
        help="scope denoiser: compare the raw output of both guidance branches rather than "
        "the guided noise uncond + g (cond - uncond) the sampler steps with",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="dtype the denoiser is quantized in (float parts keep it)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where to calibrate, measure and quantize: cpu (default) or cuda[:N]",
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
        "--out",
        type=Path,
        required=True,
        help="folder for the sensitivity table (quantize --analysis plans from it), its journal "
        "(--resume), the frontier, sensitivity.json, plan.json and report.md",
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
    how.add_argument(
        "--analysis",
        type=Path,
        metavar="DIR",
        help="plan from a saved analysis (analyze --out DIR, or an SQNR artifact) to --target-sqnr "
        "/ --budget-* / --point: nothing is measured again",
    )
    q.add_argument("--point", type=int, help="with --analysis: take this point of its frontier")
    q.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    q.add_argument(
        "--check-images",
        type=int,
        help="uniform recipes: images sampled FP vs quantized for the manifest's end-to-end "
        "numbers (default: 8, fewer if --max-minutes needs)",
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
    except KeyboardInterrupt:
        where = getattr(args, "out", None)
        if args.command != "evaluate" and where is not None:
            print(
                f"\ninterrupted: what was measured is in {where}'s journal; run the same "
                "command with --resume to go on from it",
                file=sys.stderr,
            )
        return 130


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


def options_from_args(args, pipe):
    from quantization.calibration import resolve_conditions
    from quantization.options import QuantizeOptions

    return QuantizeOptions(
        backend=args.backend,
        granularity=args.granularity,
        calibration=args.calibration,
        calibration_steps=args.calibration_steps,
        calibration_prompts=args.calibration_prompts,
        prompts=args.trajectory_prompts,
        recorded_steps=args.recorded_steps,
        unit=args.unit,
        scope=args.scope,
        refine=args.refine,
        checks=args.checks,
        detail=args.detail,
        # planning from a saved analysis asks what it was measured on, flags or not
        conditions=None
        if getattr(args, "analysis", None) is not None and not (args.prompts or args.classes)
        else resolve_conditions(pipe, args.src, args.prompts, args.classes),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        target_sqnr_db=args.target_sqnr,
        budget_ratio=args.budget_ratio,
        budget_bytes=args.budget_bytes,
        smoothing=True if args.smoothing else False if args.no_smoothing else None,
        time_protection=not args.no_time_protection,
        guided=not args.raw_outputs,
        check_images=getattr(args, "check_images", None),
        latency_images=args.latency_images,
        max_minutes=args.max_minutes,
        analysis_dir=args.out if args.command == "analyze" else args.out / "analysis",
        resume=args.resume,
    )


def _quantize_or_analyze(args) -> int:
    from quantization.artifact import DTYPES as TORCH_DTYPES
    from quantization.artifact import open_source
    from quantization.progress import Bars

    out_used = args.out.exists() and any(
        p.name != "analysis" and p.name != "journal.jsonl" for p in args.out.iterdir()
    )
    if args.command == "quantize" and out_used and not args.resume:
        raise ValueError(f"{args.out} exists and is not empty; choose a new --out")
    start = time.perf_counter()
    print(f"loading {args.src}", file=sys.stderr, flush=True)
    pipe = open_source(args.src, torch_dtype=TORCH_DTYPES[args.dtype])
    if args.device != "cpu":
        pipe.to(args.device)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    options = options_from_args(args, pipe)
    progress = Bars()
    if args.dry_run:
        from quantization.api import plan_of_work

        if getattr(args, "recipe", None) is None:
            raise ValueError("--dry-run estimates a --recipe")
        work = plan_of_work(pipe, args.recipe, options=options, source=args.src, progress=progress)
        progress.done()
        progress.plan(work)
        print(json.dumps(work.to_json(), indent=1))
        return 0
    if args.command == "analyze":
        summary = _analyze(args, pipe, options, progress)
    else:
        summary = _quantize(args, pipe, options, progress)
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 1)}, indent=1))
    return 0


def _analyze(args, pipe, options, progress) -> dict:
    """The sensitivity table and its journal, the frontier, sensitivity.json, plan.json and
    report.md with plots, into --out."""
    from quantization.api import analyze_pipeline
    from quantization.artifact import save_analysis
    from quantization.plan import plan_to_json
    from quantization.report import analysis_markdown

    done = analyze_pipeline(pipe, args.recipe, options=options, source=args.src, progress=progress)
    out = args.out
    assert done.analysis is not None and done.table is not None
    save_analysis(out, done.table, done.analysis, **done._saved)
    (out / "plan.json").write_text(json.dumps(plan_to_json(done.plan), indent=1) + "\n")
    (out / "report.md").write_text("\n".join(analysis_markdown(out, done.analysis)))
    return {"out": str(out), **done.measured, "predicted_sqnr_db": done.analysis.predicted_sqnr_db}


def _quantize(args, pipe, options, progress) -> dict:
    from quantization.api import quantize, quantize_from_analysis
    from quantization.plan import plan_from_json

    if args.analysis is not None:
        result = quantize_from_analysis(
            pipe,
            args.analysis,
            options=options,
            source=args.src,
            progress=progress,
            point=args.point,
        )
    else:
        if args.point is not None:
            raise ValueError("--point takes a frontier point of --analysis DIR")
        how = (
            args.recipe if args.plan is None else plan_from_json(json.loads(args.plan.read_text()))
        )
        result = quantize(pipe, how, options=options, source=args.src, progress=progress)
        if args.plan is not None:
            result.plan_origin = f"plan from {args.plan}"
    progress.note(f"writing {args.out}")
    manifest = result.save(args.out)
    return {"out": str(args.out), "backend": result.backend, **result.measured, **manifest["sizes"]}
