"""The plan: per layer, how it is quantized; and the planner that chooses it. Pure, torch-free.

A plan is plain JSON keyed by module name: the weights and activations dtypes (``"none"`` for
float activations), the group size, the activation granularity, the block the layer belongs
to, the SmoothQuant alpha if smoothed, and whether it was found time-sensitive. It is what
``quantize --plan`` reads and what an artifact stores.

The planner (global treatment): choose a precision level per block from measured SQNR and
size. Quantization noise of different blocks is treated as independent and additive: if block
b alone gives SQNR s_b (its *relative* SQNR), the model with several quantized blocks has noise
power sum_b 10^(-s_b / 10) relative to the signal. The greedy loop promotes the block whose
promotion (to any higher level: a block that gains little from float activations may still
gain much from float weights) buys the most predicted SQNR per unit of cost, until a target
SQNR is reached or every promotion left would break a size budget.

The cost of a promotion, where every level's latency was measured on the device
(``quantization.latency``): the time it adds as a fraction of the base plan's time, plus the
bytes it adds as a fraction of the base plan's bytes; a promotion that saves time (float on a
layer too small for int8 to pay) costs only its bytes, and one that saves both is nearly free.
Without latencies, the bytes it adds plus the bytes of weights whose matmul it moves to float
activations: float activations add no byte but give up the int8 matmul, and a planner that
counted bytes alone would take every such promotion first and leave no activation quantized.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from quantization.types import LayerSpec

# After the target, a promotion taken for speed must save at least this share of the plan's
# summed layer times. quantization.latency times each layer alone and eager; on DiT-XL/2 two
# small layers (pos_embed, proj_out_2) went float for savings that the compiled step did not show.
SPEED_MIN_SHARE = 0.005

__all__ = [
    "SPEED_MIN_SHARE",
    "BlockOption",
    "LayerPlan",
    "LevelChoice",
    "Promotion",
    "explain",
    "greedy_plan",
    "plan_from_json",
    "plan_to_json",
    "predicted_sqnr_db",
    "specs_of",
]


@dataclass(frozen=True)
class LayerPlan:
    weights: str
    activations: str | None
    group_size: int | None = None
    granularity: str | None = "tensor"
    block: str | None = None
    smoothing_alpha: float | None = None
    time_sensitive: bool = False

    def __post_init__(self) -> None:
        if self.activations is None:  # float activations have no granularity: one spelling
            object.__setattr__(self, "granularity", None)

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(self.weights, self.activations, self.group_size, self.granularity)


def plan_to_json(plan: dict[str, LayerPlan]) -> dict:
    out = {}
    for name, lp in sorted(plan.items()):
        entry = asdict(lp)
        entry["activations"] = lp.activations or "none"
        out[name] = entry
    return out


def plan_from_json(raw: dict) -> dict[str, LayerPlan]:
    """Read a plan, validating every entry (an unknown dtype or field is an error, not a guess)."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("a plan is a non-empty JSON object keyed by layer name")
    plan = {}
    fields = set(LayerPlan.__dataclass_fields__)
    for name, entry in raw.items():
        if not isinstance(entry, dict) or "weights" not in entry:
            raise ValueError(f"plan entry {name!r} needs at least a 'weights' dtype")
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(f"plan entry {name!r} has unknown fields {sorted(unknown)}")
        activations = entry.get("activations", "none")
        try:
            lp = LayerPlan(
                **{**entry, "activations": None if activations in (None, "none") else activations}
            )
            lp.spec  # noqa: B018 - validates the dtypes, group size and granularity
        except (TypeError, ValueError) as e:
            raise ValueError(f"plan entry {name!r}: {e}") from None
        plan[name] = lp
    return plan


def specs_of(plan: dict[str, LayerPlan]) -> dict[str, LayerSpec]:
    return {name: lp.spec for name, lp in plan.items()}


@dataclass(frozen=True)
class BlockOption:
    """One precision level of one block: its relative SQNR (dB), its weight bytes, the
    bytes of its weights that multiply float activations at that level (0 when every
    activation is quantized; all of them at "float"), and its measured latency (ms; None:
    not measured)."""

    level: str
    sqnr_db: float
    weight_bytes: int
    float_matmul_bytes: int = 0
    latency_ms: float | None = None

    def cost_to(self, other: BlockOption, scale: _Scale | None = None) -> float:
        """What promoting from this level to ``other`` costs (the module doc): with a
        ``scale`` (latencies measured), time and bytes as fractions of the base plan's."""
        extra_bytes = other.weight_bytes - self.weight_bytes
        if scale is not None and self.latency_ms is not None and other.latency_ms is not None:
            cost = (other.latency_ms - self.latency_ms) / scale.ms
            cost += max(extra_bytes, 0) / scale.bytes
            return max(cost, MIN_COST)
        return max(extra_bytes + max(other.float_matmul_bytes - self.float_matmul_bytes, 0), 1)


MIN_COST = 1e-6  # a promotion that saves time and adds no byte is nearly free, never free


@dataclass(frozen=True)
class _Scale:
    """The base plan's total time and bytes: what a promotion's cost is a fraction of."""

    ms: float
    bytes: float


def _scale_of(options: dict[str, list[BlockOption]]) -> _Scale | None:
    if not options or any(o.latency_ms is None for opts in options.values() for o in opts):
        return None
    ms = sum(opts[0].latency_ms or 0.0 for opts in options.values())
    nbytes = sum(opts[0].weight_bytes for opts in options.values())
    return _Scale(max(ms, 1e-9), max(nbytes, 1))


@dataclass(frozen=True)
class Promotion:
    """One step of the greedy path: the block, its new level, the end-to-end SQNR predicted
    after it, the plan's bytes after it, and what it was chosen for (``from_level``, the dB
    it bought, the milliseconds and bytes it added)."""

    block: str
    to_level: str
    predicted_sqnr_db: float
    weight_bytes: int
    from_level: str = ""
    gain_db: float = 0.0
    added_ms: float | None = None
    added_bytes: int = 0
    reason: str = "buys SQNR"  # or "saves time": taken after the target, for speed


@dataclass
class LevelChoice:
    levels: dict[str, str]  # block -> chosen level
    predicted_sqnr_db: float
    weight_bytes: int
    promotions: list[Promotion] = field(default_factory=list)


def _noise(sqnr_db: float) -> float:
    return 0.0 if math.isinf(sqnr_db) else 10.0 ** (-sqnr_db / 10.0)


def _db_of(noise: float) -> float:
    return math.inf if noise <= 0 else -10.0 * math.log10(noise)


def predicted_sqnr_db(options: dict[str, list[BlockOption]], chosen: dict[str, int]) -> float:
    """End-to-end SQNR predicted from the blocks' relative SQNRs at the chosen level indices."""
    total = sum(_noise(options[b][i].sqnr_db) for b, i in chosen.items())
    return math.inf if total == 0 else -10.0 * math.log10(total)


def greedy_plan(
    options: dict[str, list[BlockOption]],
    *,
    target_sqnr_db: float | None = None,
    budget_bytes: int | None = None,
    start: dict[str, str] | None = None,
    promotions: int | None = None,
    save_time: bool = False,
) -> LevelChoice:
    """Promote blocks greedily by predicted SQNR gain per unit of cost (see the module doc).

    Args:
        options: per block, its levels from the base recipe (index 0) to the most precise.
        target_sqnr_db: stop as soon as the predicted end-to-end SQNR reaches this.
        budget_bytes: never exceed this total weight size.
        start: levels to start from instead of the base (a plan already checked: promoting
            further from it never takes back what it has).
        promotions: stop after this many (a point of the frontier's path).
        save_time: with latencies, once the target is met (or nothing more can be bought),
            go on taking the promotions that make the plan faster and no noisier (float on
            a layer too small for int8 to pay back its per-call cost), the most milliseconds
            saved per byte first, while the budget allows: the fastest plan that meets the
            target within the budget.
    At least one of the two must be given; with both, whichever stops first wins.
    """
    if target_sqnr_db is None and budget_bytes is None and promotions is None:
        raise ValueError("give a target SQNR, a size budget, or both")
    index = {b: {o.level: i for i, o in enumerate(opts)} for b, opts in options.items()}
    chosen = {b: index[b][start[b]] if start and b in start else 0 for b in options}
    size = sum(options[b][i].weight_bytes for b, i in chosen.items())
    if budget_bytes is not None and size > budget_bytes:
        raise ValueError(f"the base recipe already needs {size} bytes > budget {budget_bytes}")
    total = sum(_noise(options[b][i].sqnr_db) for b, i in chosen.items())
    current = predicted_sqnr_db(options, chosen)
    plan = LevelChoice({}, current, size)
    scale = _scale_of(options)
    while target_sqnr_db is None or current < target_sqnr_db:
        if promotions is not None and len(plan.promotions) >= promotions:
            break
        best = None
        for block, j, here, there in _within(options, chosen, size, budget_bytes):
            after = total - _noise(here.sqnr_db) + _noise(there.sqnr_db)
            gain = _db_of(after) - current
            score = gain / here.cost_to(there, scale)
            if gain > 0 and (best is None or score > best[0]):
                best = (score, block, j)
        if best is None:
            break
        _, block, j = best
        total += _noise(options[block][j].sqnr_db) - _noise(options[block][chosen[block]].sqnr_db)
        total = max(total, 0.0)
        size, current = _take(options, chosen, plan, block, j, size, "buys SQNR")
    if save_time and scale is not None:
        size, current = _save_time(options, chosen, plan, size, budget_bytes, promotions)
    plan.levels = {b: options[b][i].level for b, i in chosen.items()}
    plan.predicted_sqnr_db, plan.weight_bytes = current, size
    return plan


def _save_time(
    options: dict[str, list[BlockOption]],
    chosen: dict[str, int],
    plan: LevelChoice,
    size: int,
    budget_bytes: int | None,
    promotions: int | None,
) -> tuple[int, float]:
    """Once the target is met: every promotion left that is faster and no noisier, the most
    milliseconds saved per byte first, while the budget allows (in place; the new size and
    predicted SQNR). A promotion that saves less than ``SPEED_MIN_SHARE`` of the plan's
    time is not taken: each layer is timed alone and eager, and a saving that small is
    within what that proxy gets wrong about the compiled step."""
    current = predicted_sqnr_db(options, chosen)
    step_ms = sum(options[b][i].latency_ms or 0.0 for b, i in chosen.items())
    while promotions is None or len(plan.promotions) < promotions:
        best = None
        for block, j, here, there in _within(options, chosen, size, budget_bytes):
            saved = (here.latency_ms or 0.0) - (there.latency_ms or 0.0)
            if saved <= SPEED_MIN_SHARE * step_ms or there.sqnr_db < here.sqnr_db:
                continue
            score = saved / max(there.weight_bytes - here.weight_bytes, 1)
            if best is None or score > best[0]:
                best = (score, block, j)
        if best is None:
            break
        _, block, j = best
        size, current = _take(options, chosen, plan, block, j, size, "saves time")
    return size, current


def _within(
    options: dict[str, list[BlockOption]],
    chosen: dict[str, int],
    size: int,
    budget_bytes: int | None,
) -> Iterator[tuple[str, int, BlockOption, BlockOption]]:
    """Every promotion left (block, level index, from, to) that keeps within the budget."""
    for block, i in chosen.items():
        here = options[block][i]
        for j in range(i + 1, len(options[block])):
            there = options[block][j]
            if (
                budget_bytes is None
                or size + there.weight_bytes - here.weight_bytes <= budget_bytes
            ):
                yield block, j, here, there


def _take(
    options: dict[str, list[BlockOption]],
    chosen: dict[str, int],
    plan: LevelChoice,
    block: str,
    j: int,
    size: int,
    reason: str,
) -> tuple[int, float]:
    """Promote ``block`` to its level ``j`` (in place) and record it on ``plan``'s path;
    the new size and predicted SQNR."""
    here, there = options[block][chosen[block]], options[block][j]
    before = predicted_sqnr_db(options, chosen)
    chosen[block] = j
    size += there.weight_bytes - here.weight_bytes
    current = predicted_sqnr_db(options, chosen)
    added_ms = (
        None
        if here.latency_ms is None or there.latency_ms is None
        else there.latency_ms - here.latency_ms
    )
    gain = current - before if math.isfinite(current) else math.inf
    plan.promotions.append(
        Promotion(
            block,
            there.level,
            current,
            size,
            here.level,
            gain,
            added_ms,
            there.weight_bytes - here.weight_bytes,
            reason,
        )
    )
    return size, current


def explain(
    options: dict[str, list[BlockOption]], choice: LevelChoice, target_sqnr_db: float | None
) -> dict[str, str]:
    """Why each block is at its level in ``choice``: in words, from the options it had and
    the promotions that moved it (what a manifest keeps)."""
    moved: dict[str, list[tuple[int, Promotion]]] = {}
    for i, p in enumerate(choice.promotions, 1):
        moved.setdefault(p.block, []).append((i, p))
    reached = "inf" if math.isinf(choice.predicted_sqnr_db) else f"{choice.predicted_sqnr_db:.1f}"
    if target_sqnr_db is None:
        unmoved = f"no target: the budget ended the plan at {reached} dB predicted"
    elif choice.predicted_sqnr_db >= target_sqnr_db:
        unmoved = f"the plan met its {target_sqnr_db:g} dB target ({reached} dB predicted)"
    else:
        unmoved = (
            f"the budget stopped the plan at {reached} dB predicted (target {target_sqnr_db:g})"
        )
    out = {}
    for block, level in choice.levels.items():
        opts = {o.level: o for o in options[block]}
        base = options[block][0]
        alone = _words(base)
        if block not in moved:
            out[block] = f"{level}, the base ({alone}): {unmoved} without promoting it"
            continue
        steps = "; ".join(
            f"#{i}: {p.from_level} -> {p.to_level} "
            f"({_words(opts[p.to_level])}), +{p.gain_db:.2f} dB predicted"
            + ("" if p.added_ms is None else f", {p.added_ms:+.3f} ms")
            + f", {p.added_bytes:+d} bytes"
            + (", taken for speed after the target" if p.reason == "saves time" else "")
            for i, p in moved[block]
        )
        out[block] = f"{level}, promoted from the base ({alone}) by the planner: {steps}"
    return out


def _words(o: BlockOption) -> str:
    db = "no noise" if math.isinf(o.sqnr_db) else f"{o.sqnr_db:.1f} dB alone"
    return db if o.latency_ms is None else f"{db}, {o.latency_ms:.3f} ms"
