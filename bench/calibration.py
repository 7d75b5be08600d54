"""Activation scales, side by side: static per tensor calibrated at one step (t = T) or at
every step, static per range of timesteps (calibrated on every step), and dynamic per token;
end-to-end quality and what each costs.

    python -m bench.calibration                       # both embedded models, DEFAULT_VARIANTS
    python -m bench.calibration --models t2i-digits --variants w4a8-sqnr@quanto

For each model and variant, static per-tensor scales are calibrated on the same 32 prompts
either at the first sampling step only or at every step; scales per timestep range on every
step, one set per range; per-token scales are found at run time and need none. Each quantized
pipeline samples the same 64 seeded prompts as FP. Calibration time = recording the FP inputs
+ calibrating and quantizing the copy. For an SQNR-driven recipe the plan (levels,
treatments) is made once, with single-step calibration, and then quantized with each
calibration, so that only the calibration differs. Writes bench/results/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.reference import fp_reference
from models.evaluator import Evaluator
from pipelines.generate import sample
from quality.metrics import psnr_db, sqnr_db
from quantization import backends
from quantization.api import quantize, quantize_denoiser
from quantization.blocks import denoiser_swapped
from quantization.calibration import record_calibration
from quantization.options import QuantizeOptions
from quantization.types import get_recipe

RESULTS = Path(__file__).resolve().parent / "results"
# static per-tensor scales calibrated at one step or at all, on either backend; static scales
# per timestep range (quanto); per-token dynamic scales (torchao), which need no calibration
DEFAULT_VARIANTS = [
    "w8a8-static@quanto",
    "w8a8-static:timestep@quanto",
    "w8a8-static@torchao",
    "w8a8-static:token@torchao",
    "w4a8-g128@quanto",
    "w4a8-g128:timestep@quanto",
    "w4a8-g128:token@torchao",
    "w4a8-sqnr@quanto",
    "w4a8-sqnr:timestep@quanto",
]
KINDS = {  # the calibrations each granularity is measured with
    "tensor": ("single-step", "multi-step"),
    "timestep": ("per-range",),
    "token": ("dynamic",),
}


@torch.no_grad()
def compare(model: str, variants: list[str], n: int, prompts: int) -> list[dict]:
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
    calib_conditions = ref.calibration.pick(pipe, prompts, "calibration")
    for variant in variants:
        name, _, backend = variant.partition("@")
        recipe, _, granularity = name.partition(":")
        r = get_recipe(recipe).with_granularity(granularity or None)
        backend = backend or r.backend
        plan = None
        if r.mixed_precision:  # planned as shipped (per tensor), then calibrated as the variant
            r = r.with_granularity("tensor")
            options = QuantizeOptions(
                backend=backend,
                calibration_prompts=prompts,
                conditions=ref.calibration,
                num_inference_steps=kw["num_inference_steps"],
                guidance_scale=kw["guidance_scale"],
            )
            plan = quantize(pipe, r, options=options, source=model).plan
            if granularity:
                plan = {
                    n: replace(lp, granularity=granularity) if lp.activations else lp
                    for n, lp in plan.items()
                }
        grain = granularity or r.granularity
        for kind in KINDS[grain] if r.activations else ("dynamic",):
            calib = record_calibration(
                pipe,
                attr,
                calib_conditions,
                kind={"dynamic": "single-step", "per-range": "multi-step"}.get(kind, kind),
                **kw,
            )
            start = time.perf_counter()
            result = quantize_denoiser(
                ref.denoiser, r if plan is None else plan, calib.calls, backend=backend
            )
            quantize_seconds = time.perf_counter() - start
            with denoiser_swapped(pipe, result.model):
                q = sample(pipe, ref.conditions, seed=0, **kw)
            seconds = 0.0 if kind == "dynamic" else calib.seconds
            row = {
                "model": model,
                "variant": variant,
                "backend": backend,
                "granularity": grain if r.activations else None,
                "calibration": kind,
                "calibration_steps": 0 if kind == "dynamic" else len(calib.steps),
                "calibration_prompts": 0 if kind == "dynamic" else prompts,
                "record_seconds": round(seconds, 3),
                "quantize_seconds": round(quantize_seconds, 3),
                "calibration_seconds": round(seconds + quantize_seconds, 3),
                "sqnr_latent_db": round(sqnr_db(fp.latents, q.latents), 3),
                "psnr_db": round(psnr_db(fp.images, q.images), 3),
                "prompt_accuracy": evaluator.prompt_accuracy(q.images, targets).prompt_accuracy,
                "denoiser_weight_bytes": backends.get(backend).nbytes(result.model),
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
    p.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help="RECIPE[:tensor|:timestep|:token][@BACKEND] (default: %(default)s)",
    )
    p.add_argument("--n", type=int, default=64, help="evaluation images (default 64)")
    p.add_argument("--prompts", type=int, default=32, help="calibration prompts (default 32)")
    p.add_argument("--out", type=Path, default=RESULTS / "calibration.json")
    args = p.parse_args(argv)
    rows = [r for m in args.models for r in compare(m, args.variants, args.n, args.prompts)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": args.n, "seed": 0, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
