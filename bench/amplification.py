"""How much per-step denoiser noise each embedded model's sampling turns into final-latent noise.

    python -m bench.amplification                     # both embedded models

A denoiser with per-step SQNR s (same inputs, FP against perturbed outputs) gives final latents
with SQNR s - a after a whole sampling run; a is the amplification of the trajectory (20 guided
DPM-Solver steps). It is measured here with perturbations whose per-step SQNR is known: weights
rounded to fp16 and to bf16, int8 weights per channel with float activations (w8a16), and w8a16
and w8a8 (static per-tensor activations, quanto) each with and without the output head in
float. Same 64 seeded images as
``python -m quantization evaluate``; per-step SQNR over the FP trajectories of 8 other prompts,
as in the sensitivity analysis. Writes bench/results/amplification.json.

What it tells: how much image PSNR a recipe can hope for on a model. If int8 weights alone
(w8a16) already miss a PSNR bar, adding int8 activations to the same weights adds noise and
does not bring the bar closer.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch

from bench.record import save
from bench.reference import fp_reference
from pipelines.generate import final_latents, sample
from quality.metrics import psnr_db, sqnr_db
from quantization import backends
from quantization.analysis import find_units, uniform_plan
from quantization.api import quantize_denoiser
from quantization.blocks import denoiser_swapped
from quantization.calibration import SEEDS, record_calibration
from quantization.measure import Measurer
from quantization.recording import record_trajectory
from quantization.types import get_recipe

RESULTS = Path(__file__).resolve().parent / "results"
HEAD = ("proj_out_1", "proj_out_2", "conv_out")  # the blocks that write the denoiser's output


def rounded(denoiser: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A float32 copy whose parameters went through ``dtype`` and back."""
    model = copy.deepcopy(denoiser)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
    return model


def quantized(denoiser, recipe: str, calls, *, head_float: bool = False) -> torch.nn.Module:
    plan = uniform_plan(
        find_units(denoiser, backends.get("quanto").LAYERS, "block"), get_recipe(recipe)
    )
    if head_float:
        plan = {n: lp for n, lp in plan.items() if lp.block not in HEAD}
    return quantize_denoiser(denoiser, plan, calls, backend="quanto").model


def noise_to_signal_at_t_max(scheduler) -> float:
    """sigma / alpha at the first sampling step: how much an eps error weighs in x0 there."""
    abar = float(scheduler.alphas_cumprod[-1])
    return math.sqrt((1.0 - abar) / abar)


@torch.no_grad()
def measure(model: str, n: int) -> dict:
    ref = fp_reference(model, n)
    pipe, attr, kw, fp_denoiser = ref.pipe, ref.attr, ref.sampling, ref.denoiser
    given = ref.calibration
    calib = record_calibration(pipe, attr, given.pick(pipe, 32, "calibration"), **kw)
    measured_on = given.pick(pipe, 8, "trajectory")
    seeds = [SEEDS["trajectory"] + i for i in range(len(measured_on))]
    recording = record_trajectory(
        fp_denoiser,
        lambda: final_latents(pipe, measured_on, seeds, **kw),
        keep=list(range(kw["num_inference_steps"])),
        blocks=[],
        layers=[],
    )
    measurer = Measurer(fp_denoiser, recording, backends.get("quanto"))
    variants = {
        "fp16 weights": lambda: rounded(fp_denoiser, torch.float16),
        "bf16 weights": lambda: rounded(fp_denoiser, torch.bfloat16),
        "w8a16": lambda: quantized(fp_denoiser, "w8a16", calib.calls),
        "w8a16, head float": lambda: quantized(fp_denoiser, "w8a16", calib.calls, head_float=True),
        "w8a8": lambda: quantized(fp_denoiser, "w8a8-static", calib.calls),
        "w8a8, head float": lambda: quantized(
            fp_denoiser, "w8a8-static", calib.calls, head_float=True
        ),
    }
    rows = []
    for name, build in variants.items():
        denoiser = build()
        step = measurer.replayed(denoiser).sqnr_db
        with denoiser_swapped(pipe, denoiser):
            q = sample(pipe, ref.conditions, seed=0, **kw)
        latent = sqnr_db(ref.fp.latents, q.latents)
        row = {
            "variant": name,
            "step_sqnr_db": round(step, 2),
            "sqnr_latent_db": round(latent, 2),
            "amplification_db": round(step - latent, 2),
            "psnr_db": round(psnr_db(ref.fp.images, q.images), 2),
        }
        print(model, row, flush=True)
        rows.append(row)
    return {
        "model": model,
        "beta_schedule": pipe.scheduler.config.beta_schedule,
        "sigma_over_alpha_at_t_max": round(noise_to_signal_at_t_max(pipe.scheduler), 1),
        **kw,
        "variants": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.amplification",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["dit-digits", "t2i-digits"])
    p.add_argument("--n", type=int, default=64, help="evaluation images (default 64)")
    p.add_argument("--out", type=Path, default=RESULTS / "amplification.json")
    args = p.parse_args(argv)
    models = [measure(m, args.n) for m in args.models]
    save(args.out, "python -m bench.amplification", images=args.n, seed=0, models=models)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
