"""python -m quantization analyze | quantize | evaluate  (see --help of each)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quantization.recipes import RECIPES

RECIPE_HELP = "recipes:\n" + "\n".join(f"  {r.name:<11} {r.summary}" for r in RECIPES.values())

DESCRIPTION = """\
Post-training quantization of a diffusers pipeline's denoiser (DiT, PixArt, SD UNet), driven by
SQNR. SRC is a local pipeline folder (e.g. models/dit-digits) or a hub id (read from the local
cache; nothing is downloaded when HF_HUB_OFFLINE=1).

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
    p.add_argument("--steps", type=int, help="sampling steps (default: the folder's defaults.json)")
    p.add_argument(
        "--guidance", type=float, help="guidance scale (default: the folder's defaults.json)"
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
        default=8,
        help="prompts whose full FP trajectory SQNR is measured on (default 8)",
    )
    p.add_argument(
        "--target-sqnr", type=float, help="w4a8-sqnr: predicted denoiser SQNR to reach, dB"
    )
    p.add_argument(
        "--budget-ratio",
        type=float,
        help="w4a8-sqnr: the denoiser weighs at most this many times what the base recipe "
        "makes it weigh (default 1.2)",
    )
    p.add_argument(
        "--budget-bytes",
        type=int,
        help="w4a8-sqnr: the denoiser weighs at most this many bytes (overrides --budget-ratio)",
    )
    p.add_argument("--no-smoothing", action="store_true", help="w4a8-sqnr: switch SmoothQuant off")
    p.add_argument(
        "--no-time-protection",
        action="store_true",
        help="w4a8-sqnr: quantize the activations of time-sensitive layers too",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype the denoiser is quantized in (quantized weights keep it)",
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
    settings = EvalSettings(args.n, args.seed, args.steps, args.guidance, args.batch_size)
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


def _quantize_or_analyze(args) -> int:
    from quantization import run

    if args.command == "quantize" and args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} exists and is not empty; choose a new --out")
    stages = Stages(run.stage_count(args), f"{args.command} {args.src}")
    start = time.perf_counter()
    try:
        summary = run.run(args, progress=stages)
    finally:
        stages.close()
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 1)}, indent=1))
    return 0
