"""Single-step against multi-step calibration: end-to-end quality and what each costs.

    python -m bench.calibration                       # both embedded models, w8a8 and w4a8-g128

For each model and recipe, the denoiser is calibrated on the same 32 prompts either at the first
sampling step only (t = T) or at every step, then both quantized pipelines sample the same 64
seeded prompts as FP. Calibration time = recording the FP inputs + calibrating and freezing the
quantized copy. For w4a8-sqnr the plan (levels, treatments) is made once, with single-step
calibration, and then quantized with each calibration, so that only the calibration differs.
Writes bench/results/calibration.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.reference import fp_reference
from models.generate import sample
from quality.evaluator import Evaluator
from quality.metrics import psnr_db, sqnr_db
from quantization.blocks import denoiser_swapped
from quantization.calibration import calibration_conditions, record_calibration, record_trajectory
from quantization.ptq import analyze, quantize_denoiser
from quantization.recipes import get_recipe
from quantization.sensitivity import Measurer

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def compare(model: str, recipes: list[str], n: int, prompts: int) -> list[dict]:
    ref = fp_reference(model, n)
    pipe, attr, kw = ref.pipe, ref.attr, ref.sampling
    fp, targets = ref.fp, ref.targets
    evaluator = Evaluator.load()
    rows = [
        {
            "model": model,
            "variant": "fp",
            "prompt_accuracy": evaluator.prompt_accuracy(fp.images, targets).prompt_accuracy,
        }
    ]
    calib_conditions = calibration_conditions(pipe, prompts)
    for recipe in recipes:
        plan = None
        if get_recipe(recipe).mixed_precision:
            single = record_calibration(pipe, attr, calib_conditions, **kw)
            trajectory = record_trajectory(pipe, attr, 8, **kw)
            plan = analyze(
                Measurer(ref.denoiser, single.calls, trajectory.calls),
                get_recipe(recipe),
                detail=False,
            ).plan
        for kind in ("single-step", "multi-step"):
            calib = record_calibration(pipe, attr, calib_conditions, kind=kind, **kw)
            result = quantize_denoiser(ref.denoiser, get_recipe(recipe), calib.calls, plan=plan)
            with denoiser_swapped(pipe, result.model):
                q = sample(pipe, ref.conditions, seed=0, **kw)
            row = {
                "model": model,
                "variant": recipe,
                "calibration": kind,
                "calibration_steps": len(calib.steps),
                "calibration_prompts": prompts,
                "record_seconds": round(calib.seconds, 3),
                "quantize_seconds": round(result.seconds, 3),
                "calibration_seconds": round(calib.seconds + result.seconds, 3),
                "sqnr_latent_db": round(sqnr_db(fp.latents, q.latents), 3),
                "psnr_db": round(psnr_db(fp.images, q.images), 3),
                "prompt_accuracy": evaluator.prompt_accuracy(q.images, targets).prompt_accuracy,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.calibration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["dit-digits", "t2i-digits"])
    p.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8-g128", "w4a8-sqnr"])
    p.add_argument("--n", type=int, default=64, help="evaluation images (default 64)")
    p.add_argument("--prompts", type=int, default=32, help="calibration prompts (default 32)")
    p.add_argument("--out", type=Path, default=RESULTS / "calibration.json")
    args = p.parse_args(argv)
    rows = [r for m in args.models for r in compare(m, args.recipes, args.n, args.prompts)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": args.n, "seed": 0, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
