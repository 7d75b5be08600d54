"""The plan of work: what each stage costs, before it starts, and the effort that fits a budget.

Pure arithmetic on a few timings taken on the device (``quantization.probe``): one FP denoiser
call (split per block by hooks), a quantized copy of the slowest block at each level, one VAE
decoding. Each stage's cost is its denoiser calls (or block calls) times those timings:

- calibration: one call per batch of calibration conditions at the first step (single-step),
  or every step (multi-step); none when every activation is per token (dynamic);
- trajectory: one FP sampling of the measuring conditions, every step (the recording);
- sensitivity: per unit x measured level, the unit's block (scope "block") or the blocks from
  the unit's on (scope "denoiser"), on each recorded step;
- checks: a quantized sampling of the measuring conditions per check, plus the units a check
  blames, each sampled once more with only that unit quantized;
- detail: accumulated SQNR (a replay per block), per-layer SQNR, the treatments' gains.

``choose_effort`` walks ``LADDER`` from the most thorough effort down and takes the first whose
estimate fits ``--max-minutes``; when none does, it refuses and says what would.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

# One layer timing (quantization.latency): warm-up calls, then at least this many repeats
# and at least this long.
TIMING_WARMUP = 2
TIMING_REPEATS = 5
TIMING_MIN_SECONDS = 0.05

__all__ = [
    "DEFAULT_MAX_MINUTES",
    "LADDER",
    "Effort",
    "Shape",
    "Stage",
    "Timings",
    "WorkPlan",
    "cheapest_within",
    "choose_effort",
    "estimate",
    "recording_bytes",
]

DEFAULT_MAX_MINUTES = 20.0  # any model, unless --max-minutes says otherwise


@dataclass(frozen=True)
class Effort:
    """How thoroughly to calibrate, measure and check.

    Args:
        prompts: measuring conditions (the recorded trajectory, the checks' samples).
        recorded_steps: steps of the trajectory recorded, spread over the schedule (None: all).
        unit: "module" (each module of each block gets its own level) or "block".
        scope: where a unit's relative SQNR is taken from the recording: "denoiser" or "block".
        calibration_prompts: conditions whose first step calibrates static activations.
        refine: units a check blames that are measured end to end, per check.
        checks: end-to-end samplings of a plan at most (re-planning between them).
        detail: accumulated SQNR, per-layer SQNR and the treatments' gains (the plan needs none).
    """

    prompts: int
    recorded_steps: int | None
    unit: str
    scope: str
    calibration_prompts: int
    refine: int
    checks: int
    detail: bool

    def describe(self) -> str:
        steps = "every step" if self.recorded_steps is None else f"{self.recorded_steps} steps"
        return (
            f"{self.prompts} measuring prompts at {steps}, unit {self.unit}, scope {self.scope}, "
            f"{self.calibration_prompts} calibration prompts, {self.checks} check(s) refining "
            f"{self.refine} unit(s) each, detail {'on' if self.detail else 'off'}"
        )


# From the most thorough down; each rung costs less than the one above on any model.
LADDER: tuple[Effort, ...] = (
    Effort(32, 10, "module", "denoiser", 32, 8, 3, True),
    Effort(32, 10, "module", "denoiser", 32, 8, 3, False),
    Effort(16, 10, "module", "denoiser", 16, 4, 2, False),
    Effort(8, 8, "module", "denoiser", 8, 2, 2, False),
    Effort(4, 8, "module", "block", 8, 1, 2, False),
    Effort(2, 8, "module", "block", 8, 0, 2, False),
    Effort(1, 8, "module", "block", 4, 0, 2, False),
    Effort(1, 4, "module", "block", 2, 0, 1, False),
    Effort(1, 4, "block", "block", 2, 0, 1, False),
    Effort(1, 2, "block", "block", 1, 0, 1, False),
)


@dataclass(frozen=True)
class Timings:
    """Measured on the device, at batch ``batch`` (two probe batches give the per-call part).

    ``block_seconds``: per block, in the order blocks run; ``factor``: per level, a quantized
    block's time over FP's; ``copy_seconds_per_gb``: making a quantized copy of weights.
    """

    batch: int
    call_seconds: float
    fixed_seconds: float  # the part of a call that does not grow with the batch
    block_seconds: dict[str, float]
    factor: dict[str, float]
    decode_seconds: float
    copy_seconds_per_gb: float
    write_seconds_per_gb: float = 0.0  # writing and hashing files, as an artifact is saved
    record_bytes_per_call: int = 0  # every block's inputs and outputs in one call at ``batch``
    large_batch: int | None = None  # where a short call was timed again: its factors there
    factor_large: dict[str, float] | None = None

    def factor_at(self, level: str, batch: int) -> float:
        """A quantized block's time over FP's at ``batch`` (log-interpolated between the two
        probe batches: a quantized kernel's fixed cost weighs less in a larger batch)."""
        small = self.factor[level]
        if self.factor_large is None or self.large_batch is None or batch <= self.batch:
            return small
        if batch >= self.large_batch:
            return self.factor_large[level]
        w = math.log(batch / self.batch) / math.log(self.large_batch / self.batch)
        return small + w * (self.factor_large[level] - small)

    def worst_factor(self, batch: int) -> float:
        return max((self.factor_at(lv, batch) for lv in self.factor), default=1.0)

    def base_factor(self, batch: int) -> float:
        return self.factor_at(next(iter(self.factor)), batch) if self.factor else 1.0

    def call(self, batch: int) -> float:
        per_sample = (self.call_seconds - self.fixed_seconds) / self.batch
        return self.fixed_seconds + per_sample * batch

    def scale(self, batch: int) -> float:
        return self.call(batch) / self.call_seconds

    def from_block(self, block: str) -> float:
        """Seconds of the blocks from ``block`` on (and the glue), at the probe batch."""
        names = list(self.block_seconds)
        glue = self.call_seconds - sum(self.block_seconds.values())
        return max(glue, 0.0) + sum(self.block_seconds[b] for b in names[names.index(block) :])


@dataclass(frozen=True)
class Shape:
    """What the work is made of, for one model and recipe.

    ``units``: per unit kind ("module", "block"), the block of each unit (in run order);
    ``levels``: the levels measured per unit (float is never measured).
    """

    steps: int
    guided: bool
    units: dict[str, list[str]]
    levels: int
    static: bool  # some activation is calibrated (static scales, or smoothing)
    multi_step_calibration: bool
    planned: bool  # an SQNR-driven recipe (else: uniform, calibrate + quantize + check)
    denoiser_gb: float
    check_images: int  # uniform recipes: images sampled FP and quantized to check
    pipeline_gb: float = 0.0  # every component, as the artifact writes them
    smoothing: bool = False  # smoothing candidates are chosen on their calibration inputs
    # a recipe priced by latency: distinct layer shapes to time (at most), of how many layers
    timed_shapes: int = 0
    layers: int = 0

    def batch(self, prompts: int) -> int:
        return prompts * (2 if self.guided else 1)


@dataclass(frozen=True)
class Stage:
    name: str
    work: str  # what it runs, in words ("64 denoiser calls at batch 2")
    seconds: float


@dataclass(frozen=True)
class WorkPlan:
    effort: Effort | None
    stages: tuple[Stage, ...]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def render(self) -> str:
        lines = [f"  {s.name:<13} {s.work:<58} ~{_clock(s.seconds)}" for s in self.stages]
        head = "plan of work" + ("" if self.effort is None else f" ({self.effort.describe()})")
        return "\n".join([head + ":", *lines, f"  {'total':<13} {'':<58} ~{_clock(self.seconds)}"])

    def to_json(self) -> dict:
        return {
            "effort": None if self.effort is None else self.effort.__dict__,
            "stages": [
                {"name": s.name, "work": s.work, "seconds": round(s.seconds, 2)}
                for s in self.stages
            ],
            "seconds": round(self.seconds, 2),
        }


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def recording_bytes(effort: Effort, shape: Shape, t: Timings) -> int:
    """Memory the recording of the trajectory takes: every block's inputs and outputs at each
    recorded step, at the measuring batch."""
    recorded = (
        shape.steps if effort.recorded_steps is None else min(effort.recorded_steps, shape.steps)
    )
    return int(t.record_bytes_per_call * shape.batch(effort.prompts) / t.batch * recorded)


def estimate(effort: Effort | None, shape: Shape, t: Timings) -> WorkPlan:
    """The stages and their estimated seconds (``effort`` None: a uniform recipe)."""
    stages = []
    copy = shape.denoiser_gb * t.copy_seconds_per_gb
    if shape.static:
        n = effort.calibration_prompts if effort else 32
        calls = shape.steps if shape.multi_step_calibration else 1
        # the calls are recorded while sampling, then replayed once with a hook on every layer
        stages.append(
            Stage(
                "calibration",
                f"2 x {calls} denoiser call(s) at batch {shape.batch(n)}",
                2 * calls * t.call(shape.batch(n)),
            )
        )
    if effort is None:
        n = shape.check_images
        b = shape.batch(n)
        base_factor = t.base_factor(b)
        stages.append(Stage("quantize", f"{shape.denoiser_gb:.2f} GB of weights", copy))
        stages.append(_save(shape, t))
        if n:
            stages.append(
                Stage(
                    "check images",
                    f"{n} image(s) FP and quantized: 2 x {shape.steps} calls at batch {b}",
                    shape.steps * t.call(b) * (1 + base_factor) + 2 * n * t.decode_seconds,
                )
            )
        return WorkPlan(None, tuple(stages))
    b = shape.batch(effort.prompts)
    scale = t.scale(b)
    q, base_factor = t.worst_factor(b), t.base_factor(b)
    recorded = (
        shape.steps if effort.recorded_steps is None else min(effort.recorded_steps, shape.steps)
    )
    memory = recording_bytes(effort, shape, t) / 2**30
    stages.append(
        Stage(
            "trajectory",
            f"{shape.steps} FP calls at batch {b}, {recorded} kept ({memory:.1f} GiB)",
            shape.steps * t.call(b),
        )
    )
    if shape.smoothing:
        c = shape.batch(effort.calibration_prompts)
        stages.append(
            Stage(
                "treatments",
                f"1 denoiser call at batch {c}: the outlier layers' inputs",
                t.call(c),
            )
        )
    if shape.timed_shapes:
        timings = shape.timed_shapes * (shape.levels + 1)
        share = shape.timed_shapes / max(shape.layers, 1)
        stages.append(
            Stage(
                "latency",
                f"at most {timings} layer timings ({shape.timed_shapes} shapes x "
                f"{shape.levels + 1} levels), none for what this device has cached",
                timings * TIMING_MIN_SECONDS
                + (shape.levels + 1) * (TIMING_WARMUP + TIMING_REPEATS) * share * t.call(b) * q,
            )
        )
    blocks = shape.units[effort.unit]  # the block of each unit
    in_block = Counter(blocks)
    seconds = shape.levels * copy  # a copy of every unit at every level: the denoiser's bytes
    for block in blocks:
        own = t.block_seconds.get(block, 0.0)
        after = t.from_block(block) - own if effort.scope == "denoiser" else 0.0
        for level in t.factor:  # the unit quantized, the rest of its block float
            quantized = own * (1.0 + (t.factor_at(level, b) - 1.0) / in_block[block])
            seconds += (after + quantized) * scale * recorded
    stages.append(
        Stage(
            "sensitivity",
            f"{len(blocks)} {effort.unit}s x {shape.levels} levels at scope {effort.scope}",
            seconds,
        )
    )
    sampled = shape.steps * t.call(b)
    checks = effort.checks * (copy + sampled * base_factor + recorded * t.call(b) * base_factor)
    refine = effort.checks * effort.refine * sampled
    stages.append(
        Stage(
            "checks",
            f"{effort.checks} quantized sampling(s), "
            f"{effort.checks * effort.refine} unit(s) refined",
            checks + refine + 2 * effort.prompts * t.decode_seconds,
        )
    )
    if effort.detail:
        n_blocks = len(shape.units["block"])
        stages.append(
            Stage(
                "detail",
                f"accumulated SQNR: {n_blocks} replays; the treatments' gains: 3",
                (n_blocks + 3) * recorded * t.call(b) * q,
            )
        )
    stages.append(_save(shape, t))
    return WorkPlan(effort, tuple(stages))


def _save(shape: Shape, t: Timings) -> Stage:
    gb = shape.pipeline_gb or shape.denoiser_gb
    return Stage(
        "save", f"the artifact: {gb:.2f} GB written and hashed", gb * t.write_seconds_per_gb
    )


def cheapest_within(
    shape: Shape, t: Timings, max_minutes: float, forced: dict | None = None
) -> WorkPlan | None:
    """The ladder's cheapest effort if it fits ``max_minutes``, else None."""
    plans = [
        estimate(effort, shape, t)
        for effort in (replace(rung, **(forced or {})) for rung in LADDER)
        if effort.unit in shape.units
    ]
    cheapest = min(plans, key=lambda p: p.seconds)
    return cheapest if cheapest.seconds <= max_minutes * 60 else None


def choose_effort(
    shape: Shape,
    t: Timings,
    max_minutes: float,
    forced: dict | None = None,
    memory_bytes: int | None = None,
) -> tuple[WorkPlan, list[WorkPlan]]:
    """The most thorough effort whose estimate fits ``max_minutes`` and whose recording fits
    ``memory_bytes`` (with ``forced`` fields, the user's flags, applied to every rung), and
    every rung's plan tried.

    Raises ValueError, saying what the cheapest rung needs, when none fits.
    """
    tried = []
    for rung in LADDER:
        effort = replace(rung, **(forced or {}))
        if effort.unit not in shape.units:
            continue
        plan = estimate(effort, shape, t)
        tried.append(plan)
        fits_memory = memory_bytes is None or recording_bytes(effort, shape, t) <= memory_bytes
        if plan.seconds <= max_minutes * 60 and fits_memory:
            return plan, tried
    cheapest = min(tried, key=lambda p: p.seconds)
    need = math.ceil(cheapest.seconds / 60)
    what = cheapest.effort.describe() if cheapest.effort else "uniform"
    raise ValueError(
        f"no effort fits {max_minutes:g} minutes: the cheapest ({what}) is estimated at "
        f"{_clock(cheapest.seconds)}; pass --max-minutes {need} or more, fewer --steps, or a "
        "uniform recipe\n" + cheapest.render()
    )
