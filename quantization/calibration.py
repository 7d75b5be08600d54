"""Calibration data: the denoiser inputs recorded while the FP pipeline samples.

Single-step calibration (the default, METHOD.md step 1) keeps only the first sampling step
(t = T, where the noise is maximal) and stops sampling right there, so it costs one denoiser
call per batch of prompts. Multi-step calibration keeps every step, or K steps spread over the
schedule. Both are timed: the cost is part of what they are compared on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from models.generate import conditions_for, evaluation_targets, sample
from quantization.capture import Call, record_calls

__all__ = [
    "CALIBRATION_KINDS",
    "TRAJECTORY_SEED",
    "Calibration",
    "calibration_conditions",
    "record_calibration",
    "record_trajectory",
    "steps_for",
]

CALIBRATION_KINDS = ("single-step", "multi-step")
TRAJECTORY_SEED = 2000  # the measuring prompts differ from the calibration ones (seed 1000)


@dataclass(frozen=True)
class Calibration:
    kind: str
    steps: list[int]  # sampling step indices kept (0 = first step, t = T)
    prompts: int
    calls: list[Call]
    seconds: float  # to sample the FP pipeline up to the last kept step

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "steps": self.steps,
            "prompts": self.prompts,
            "record_seconds": self.seconds,
        }


def steps_for(kind: str, num_inference_steps: int, k: int | None = None) -> list[int]:
    """The step indices a calibration kind records: [0], all steps, or K evenly spread."""
    if kind == "single-step":
        return [0]
    if kind != "multi-step":
        raise ValueError(f"calibration kind must be one of {CALIBRATION_KINDS}, not {kind!r}")
    if k is None or k >= num_inference_steps:
        return list(range(num_inference_steps))
    if k < 1:
        raise ValueError("multi-step calibration needs K >= 1 steps")
    return sorted({round(float(i)) for i in np.linspace(0, num_inference_steps - 1, k)})


def calibration_conditions(pipe, n: int, seed: int = 1000) -> list[int] | list[str]:
    """n class ids or prompts, cycling through the digits; seeds apart from the evaluation's.

    For a real checkpoint the conditions are digit words too: they are what this package has
    without a data set; pass your own with ``record_calibration(conditions=...)``.
    """
    with_colors = not _is_class_conditional(pipe)
    return conditions_for(pipe, evaluation_targets(n, with_colors=with_colors, seed=seed))


def _is_class_conditional(pipe) -> bool:
    from diffusers import DiTPipeline

    return isinstance(pipe, DiTPipeline)


def record_calibration(
    pipe,
    denoiser_attr: str,
    conditions: list,
    *,
    kind: str = "single-step",
    k: int | None = None,
    seed: int = 1000,
    num_inference_steps: int,
    guidance_scale: float,
) -> Calibration:
    """Sample the FP pipeline on ``conditions`` and keep the denoiser inputs of the kind's steps."""
    steps = steps_for(kind, num_inference_steps, k)
    denoiser = getattr(pipe, denoiser_attr)
    start = time.perf_counter()
    calls = record_calls(
        denoiser,
        lambda: sample(
            pipe,
            conditions,
            seed=seed,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_size=len(conditions),
        ),
        steps=set(steps),
    )
    return Calibration(kind, steps, len(conditions), calls, time.perf_counter() - start)


def record_trajectory(
    pipe, denoiser_attr: str, prompts: int, *, num_inference_steps: int, guidance_scale: float
) -> Calibration:
    """Every step of the FP sampling of ``prompts`` measuring prompts: what SQNR is measured on."""
    return record_calibration(
        pipe,
        denoiser_attr,
        calibration_conditions(pipe, prompts, seed=TRAJECTORY_SEED),
        kind="multi-step",
        seed=TRAJECTORY_SEED,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )
