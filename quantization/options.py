"""What a user asks beyond the recipe (``QuantizeOptions``), and the same with every default
filled in once (``Resolved``): the recipe's own values, the folder's sampling settings, the
conditions. ``None`` in ``QuantizeOptions`` means "not given"; nothing downstream reads a
``None`` as "the recipe's" again. The measuring effort is chosen later, by the budget
(``quantization.cost``), with the fields the user gave forced on it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from quantization.calibration import CALIBRATION_KINDS, Conditions
from quantization.cost import DEFAULT_MAX_MINUTES
from quantization.types import GRANULARITIES, Recipe, get_recipe

__all__ = ["QuantizeOptions", "Resolved", "resolve"]

ANALYSIS_MAX_MINUTES = 3.0  # quantize --analysis: planning again is meant to be quick


@dataclass(frozen=True)
class QuantizeOptions:
    """How to calibrate, measure, plan and check, beyond the recipe; ``None``: not given."""

    backend: str | None = None
    granularity: str | None = None
    calibration: str = "single-step"  # granularity "timestep" always calibrates multi-step
    calibration_steps: int | None = None  # multi-step: K steps spread (None: every step)
    calibration_prompts: int | None = None
    prompts: int | None = None  # measuring conditions (the recorded trajectory, the checks)
    recorded_steps: int | None = None
    unit: str | None = None  # "block" | "module"
    scope: str | None = None  # "denoiser" | "block"
    refine: int | None = None
    checks: int | None = None
    detail: bool | None = None
    conditions: Conditions | None = None  # None: the digits data (embedded models only)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    target_sqnr_db: float | None = None
    budget_ratio: float | None = None
    budget_bytes: int | None = None
    smoothing: bool | None = None  # SmoothQuant on or off; None: as the recipe says
    time_protection: bool = True
    guided: bool = True  # measure on the guided noise the sampler steps with
    check_images: int | None = None  # uniform recipes: images sampled FP vs quantized
    latency_images: int | None = None  # recipes priced by latency: images per timed call
    max_minutes: float | None = None
    analysis_dir: Path | None = None  # analyze: where the table and its journal go
    resume: bool = False


@dataclass(frozen=True)
class Resolved:
    """Every setting decided: the recipe (its granularity applied), backend, sampling,
    conditions, target and budget, treatments, the time budget and the forced effort."""

    recipe: Recipe
    backend: str
    steps: int
    guidance: float
    conditions: Conditions
    calibration: str
    calibration_steps: int | None
    target_sqnr_db: float | None
    budget_ratio: float | None
    budget_bytes: int | None
    smoothing: bool
    time_protection: bool
    guided: bool
    check_images: int | None
    latency_images: int  # recipes priced by latency: layers timed at this many images a call
    calibration_prompts: int  # uniform recipes and plans (SQNR recipes: the effort's)
    max_minutes: float
    max_minutes_given: bool  # a budget the user set is a refusal line; the default is not
    forced: dict = field(default_factory=dict)
    analysis_dir: Path | None = None
    resume: bool = False


EFFORT_FIELDS = (
    "prompts",
    "recorded_steps",
    "unit",
    "scope",
    "calibration_prompts",
    "refine",
    "checks",
    "detail",
)


def resolve(
    options: QuantizeOptions,
    recipe: str | Recipe,
    *,
    steps: int,
    guidance: float,
    conditions: Conditions,
    from_analysis: bool = False,
) -> Resolved:
    """Fill every default of ``options`` once; ``steps``, ``guidance`` and ``conditions`` are
    the folder's (``pipelines.loader.sampling_settings``, ``resolve_conditions``)."""
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if options.granularity is not None and options.granularity != r.granularity:
        if options.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, not {options.granularity!r}"
            )
        r = replace(r, granularity=options.granularity)
    if options.calibration not in CALIBRATION_KINDS:
        raise ValueError(
            f"calibration must be one of {CALIBRATION_KINDS}, not {options.calibration!r}"
        )
    forced = {f: getattr(options, f) for f in EFFORT_FIELDS if getattr(options, f) is not None}
    if forced.get("unit") not in (None, "block", "module"):
        raise ValueError(f"unit must be block or module, not {forced['unit']!r}")
    if forced.get("scope") not in (None, "block", "denoiser"):
        raise ValueError(f"scope must be block or denoiser, not {forced['scope']!r}")
    for name in ("prompts", "calibration_prompts", "checks"):
        if name in forced and forced[name] < 1:
            raise ValueError(f"{name} must be at least 1")
    if options.smoothing and not r.mixed_precision:
        raise ValueError(
            f"--smoothing: SmoothQuant is chosen per layer by the SQNR analysis, and {r.name} "
            "is a uniform recipe; use an SQNR recipe (w8a8, w8a8-static-sqnr, w4a8-sqnr)"
        )
    if options.latency_images is not None and options.latency_images < 1:
        raise ValueError("latency_images must be at least 1")
    default_minutes = ANALYSIS_MAX_MINUTES if from_analysis else DEFAULT_MAX_MINUTES
    minutes = default_minutes if options.max_minutes is None else options.max_minutes
    if minutes <= 0:
        raise ValueError("--max-minutes must be positive")
    budget_ratio = r.budget_ratio if options.budget_ratio is None else options.budget_ratio
    return Resolved(
        recipe=r,
        backend=options.backend or r.backend,
        steps=steps,
        guidance=guidance,
        conditions=options.conditions or conditions,
        # scales per timestep range are calibrated on steps across the schedule
        calibration="multi-step" if r.granularity == "timestep" else options.calibration,
        calibration_steps=options.calibration_steps,
        target_sqnr_db=r.target_sqnr_db
        if options.target_sqnr_db is None
        else options.target_sqnr_db,
        budget_ratio=None if options.budget_bytes is not None else budget_ratio,
        budget_bytes=options.budget_bytes,
        smoothing=r.smoothing if options.smoothing is None else options.smoothing,
        time_protection=options.time_protection and r.protect_time_sensitive,
        guided=options.guided,
        check_images=options.check_images,
        latency_images=options.latency_images or 1,
        calibration_prompts=options.calibration_prompts or 32,
        max_minutes=minutes,
        max_minutes_given=options.max_minutes is not None,
        forced=forced,
        analysis_dir=options.analysis_dir,
        resume=options.resume,
    )
