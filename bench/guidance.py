"""Sensitivity measured on the guided prediction instead of the denoiser's raw output.

    python -m bench.guidance                          # both embedded models

Under classifier-free guidance the denoiser runs both branches in one batch, and the sampler
steps with ``uncond + g * (cond - uncond)``: quantization errors of the two branches enter it
multiplied by g and 1 - g, so where they differ the guided noise is noisier than either output.
For each model, the w4a8-sqnr recipe is planned at the denoiser scope twice on the same
calibration and trajectory: once comparing raw outputs (both branches), once comparing the
guided noise (the default; ``--raw-outputs`` measures the raw one). Reported per unit:
relative SQNR at the base level both ways; across units: the rank correlation of the two,
how many units the two plans give different levels, and each plan's end-to-end quality on
the same 64 seeded images as FP. Writes bench/results/guidance.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.record import save
from bench.reference import fp_reference
from models.evaluator import Evaluator
from pipelines.generate import sample
from quality.metrics import psnr_db, sqnr_db
from quantization import backends
from quantization.api import analyze_pipeline
from quantization.blocks import denoiser_swapped
from quantization.options import QuantizeOptions

RESULTS = Path(__file__).resolve().parent / "results"


def _ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties broken by order; no unit here measures exactly alike)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


@torch.no_grad()
def compare(model: str, n: int, prompts: int) -> dict:
    ref = fp_reference(model, n)
    pipe, kw = ref.pipe, ref.sampling
    evaluator = Evaluator.load()
    fp_acc = evaluator.prompt_accuracy(ref.fp.images, ref.targets).prompt_accuracy
    runs = {}
    for label in ("raw", "guided"):
        options = QuantizeOptions(
            backend="quanto",
            scope="denoiser",
            guided=label == "guided",
            calibration_prompts=prompts,
            conditions=ref.calibration,
            num_inference_steps=kw["num_inference_steps"],
            guidance_scale=kw["guidance_scale"],
            detail=True,
        )
        result = analyze_pipeline(pipe, "w4a8-sqnr", options=options, source=model)
        with denoiser_swapped(pipe, result.denoiser):
            q = sample(pipe, ref.conditions, seed=0, **kw)
        a = result.analysis
        assert a is not None
        base = a.levels[0]
        runs[label] = {
            "relative_sqnr_db": {
                unit: levels[base]["sqnr_db"] for unit, levels in a.relative_sqnr.items()
            },
            "levels": a.block_levels,
            "uniform_base_sqnr_db": a.treatment_gains.get("uniform_base_sqnr_db"),
            "plan_sqnr_db": a.measured["denoiser_sqnr_db"],
            "sqnr_latent_db": round(sqnr_db(ref.fp.latents, q.latents), 3),
            "psnr_db": round(psnr_db(ref.fp.images, q.images), 3),
            "prompt_accuracy": evaluator.prompt_accuracy(q.images, ref.targets).prompt_accuracy,
            "denoiser_weight_bytes": backends.get("quanto").nbytes(result.denoiser),
        }
    units = list(runs["raw"]["relative_sqnr_db"])
    raw = [runs["raw"]["relative_sqnr_db"][u] for u in units]
    guided = [runs["guided"]["relative_sqnr_db"][u] for u in units]
    differ = [u for u in units if runs["raw"]["levels"][u] != runs["guided"]["levels"][u]]
    worst = 5
    row = {
        "model": model,
        "guidance_scale": kw["guidance_scale"],
        "fp_prompt_accuracy": fp_acc,
        "units": len(units),
        "spearman_raw_vs_guided": round(spearman(raw, guided), 3),
        "mean_shift_db": round(float(np.mean(np.subtract(guided, raw))), 3),
        "worst_raw": [units[i] for i in np.argsort(raw)[:worst]],
        "worst_guided": [units[i] for i in np.argsort(guided)[:worst]],
        "units_planned_differently": differ,
        **runs,
    }
    summary = {k: v for k, v in row.items() if k not in runs}
    for label in runs:
        summary[label] = {
            k: runs[label][k]
            for k in ("plan_sqnr_db", "sqnr_latent_db", "psnr_db", "prompt_accuracy")
        }
    print(summary, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.guidance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["dit-digits", "t2i-digits"])
    p.add_argument("--n", type=int, default=64, help="evaluation images (default 64)")
    p.add_argument("--prompts", type=int, default=32, help="calibration prompts (default 32)")
    p.add_argument("--out", type=Path, default=RESULTS / "guidance.json")
    args = p.parse_args(argv)
    rows = [compare(m, args.n, args.prompts) for m in args.models]
    save(
        args.out,
        "python -m bench.guidance",
        images=args.n,
        seed=0,
        recipe="w4a8-sqnr, scope denoiser",
        rows=rows,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
