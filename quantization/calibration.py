"""Calibration data: what the FP pipeline is asked, and the denoiser inputs it records.

Conditions come from the user for a real checkpoint (``--prompts FILE``: one prompt per line,
for text-to-image pipelines; ``--classes 1,207,360`` or ``all``, for class-conditional ones),
and from the digits data for the embedded models. A folder that is neither is refused: a
Stable Diffusion model calibrated on "a red seven" would be calibrated on the wrong inputs.

Single-step calibration (the default; docs/quantization.md, step 1) keeps only the first
sampling step (t = T, where the noise is maximal) and stops sampling right there, so it costs
one denoiser call per batch of prompts. Multi-step calibration keeps every step, or K steps
spread over the schedule. Both are timed: the cost is part of what they are compared on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.generate import is_class_conditional, sample
from quantization.capture import Call, record_calls

__all__ = [
    "CALIBRATION_KINDS",
    "Calibration",
    "Conditions",
    "parse_classes",
    "read_prompts",
    "record_calibration",
    "resolve_conditions",
    "steps_for",
]

CALIBRATION_KINDS = ("single-step", "multi-step")
# Seeds of the noise, and of the digits data's color draws, per use: the prompts measured on
# differ from the calibration ones, and the manifest's check images from both.
SEEDS = {"calibration": 1000, "trajectory": 2000, "check": 2001}


@dataclass(frozen=True)
class Conditions:
    """What the pipeline is asked while calibrating and measuring: prompts or class ids.

    ``values`` empty means the embedded digits data, drawn per use. From a user list longer
    than needed, entries are taken evenly spread over it (``--classes all`` of a 1000-class
    model calibrates on 32 classes across the range, not on classes 0-31), measuring and
    checking half a stride off calibration; a shorter list is cycled, measuring and checking
    from half-way through. The two differ whenever the list holds at least twice as many
    entries as either needs.
    """

    kind: str  # "prompts" | "classes"
    values: tuple = ()
    origin: str = "the digits data"

    def pick(self, pipe, n: int, use: str) -> list:
        if use not in SEEDS:
            raise ValueError(f"use must be one of {tuple(SEEDS)}")
        if not self.values:
            from models.targets import conditions_for, evaluation_targets

            targets = evaluation_targets(n, with_colors=self.kind == "prompts", seed=SEEDS[use])
            return conditions_for(pipe, targets)
        size, shifted = len(self.values), use != "calibration"
        if n < size:
            stride = size / n
            return [self.values[int((i + 0.5 * shifted) * stride)] for i in range(n)]
        start = size // 2 if shifted else 0
        return [self.values[(start + i) % size] for i in range(n)]

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "origin": self.origin,
            "count": len(self.values) or None,
        }


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and surrounding spaces dropped; none at all is an error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"--prompts {path}: {e.strerror or e}") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompt (one per line)")
    return prompts


def class_count(pipe) -> int:
    """How many classes a class-conditional pipeline knows: its labels, else its embedding."""
    labels = getattr(pipe, "labels", None)
    if labels:
        return len({int(v) for v in labels.values()})
    return int(pipe.transformer.config.num_embeds_ada_norm)


def parse_classes(text: str, count: int) -> tuple[int, ...]:
    """``"all"`` or comma-separated class ids, each in [0, count)."""
    if text.strip() == "all":
        return tuple(range(count))
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"--classes {text!r}: give comma-separated class ids (1,207,360) or all"
        ) from None
    if not ids:
        raise ValueError("--classes: no class id given")
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise ValueError(f"--classes: {bad} outside the model's {count} classes (0..{count - 1})")
    return ids


def resolve_conditions(
    pipe, source: str | Path, prompts: str | Path | None = None, classes: str | None = None
) -> Conditions:
    """The conditions for ``pipe`` loaded from ``source``: the flags given, else the digits
    data if ``source`` is an embedded model; anything else is an error naming the flags."""
    from models import embedded_model

    class_conditional = is_class_conditional(pipe)
    if prompts is not None and classes is not None:
        raise ValueError("give --prompts or --classes, not both")
    if prompts is not None:
        if class_conditional:
            raise ValueError(
                f"{source} is class-conditional: pass --classes (ids or all), not --prompts"
            )
        return Conditions("prompts", read_prompts(prompts), f"--prompts {prompts}")
    if classes is not None:
        if not class_conditional:
            raise ValueError(f"{source} is text-to-image: pass --prompts FILE, not --classes")
        return Conditions("classes", parse_classes(classes, class_count(pipe)), "--classes")
    if embedded_model(source) is not None:
        return Conditions("classes" if class_conditional else "prompts")
    flag = "--classes 1,207,360 | all" if class_conditional else "--prompts FILE (one per line)"
    raise ValueError(
        f"{source} is not an embedded model, so there is nothing to calibrate it on: pass {flag}"
    )


@dataclass(frozen=True)
class Calibration:
    kind: str
    steps: list[int]  # sampling step indices kept (0 = first step, t = T)
    prompts: int
    calls: list[Call]
    seconds: float  # to sample the FP pipeline up to the last kept step
    latents: torch.Tensor | None = None  # the final latents, when sampling ran to the end

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


def record_calibration(
    pipe,
    denoiser_attr: str,
    conditions: list,
    *,
    kind: str = "single-step",
    k: int | None = None,
    seed: int = SEEDS["calibration"],
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 32,
) -> Calibration:
    """Sample the FP pipeline on ``conditions`` and keep the denoiser inputs of the kind's steps."""
    steps = steps_for(kind, num_inference_steps, k)
    denoiser = getattr(pipe, denoiser_attr)
    start = time.perf_counter()
    calls: list[Call] = []
    finished = []  # the samples of the batches that ran to the end
    # every step kept: let the sampler finish (its latents are then FP's final latents)
    keep = None if steps == list(range(num_inference_steps)) else set(steps)
    for first in range(0, len(conditions), batch_size):
        part = conditions[first : first + batch_size]
        calls += record_calls(
            denoiser,
            lambda part=part, first=first: finished.append(
                sample(
                    pipe,
                    part,
                    seed=seed + first,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    batch_size=len(part),
                )
            ),
            steps=keep,
        )
    seconds = time.perf_counter() - start
    whole = len(finished) == -(-len(conditions) // batch_size)
    latents = torch.cat([f.latents for f in finished]) if whole and finished else None
    return Calibration(kind, steps, len(conditions), calls, seconds, latents)
