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
SQNR is reached or every promotion left would break a size budget. The cost of a promotion is
the bytes it adds plus the bytes of weights whose matmul it moves to float activations: float
activations add no byte but give up the int8 matmul, and a planner that counted bytes alone
would take every such promotion first and leave no activation quantized.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from quantization.types import LayerSpec

__all__ = [
    "BlockOption",
    "LayerPlan",
    "LevelChoice",
    "Promotion",
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
    """One precision level of one block: its relative SQNR (dB), its weight bytes, and the
    bytes of its weights that multiply float activations at that level (0 when every
    activation is quantized; all of them at "float")."""

    level: str
    sqnr_db: float
    weight_bytes: int
    float_matmul_bytes: int = 0

    def cost_to(self, other: BlockOption) -> int:
        return max(
            other.weight_bytes
            - self.weight_bytes
            + max(other.float_matmul_bytes - self.float_matmul_bytes, 0),
            1,
        )


@dataclass(frozen=True)
class Promotion:
    block: str
    to_level: str
    predicted_sqnr_db: float
    weight_bytes: int


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
) -> LevelChoice:
    """Promote blocks greedily by predicted SQNR gain per unit of cost (see the module doc).

    Args:
        options: per block, its levels from the base recipe (index 0) to the most precise.
        target_sqnr_db: stop as soon as the predicted end-to-end SQNR reaches this.
        budget_bytes: never exceed this total weight size.
        start: levels to start from instead of the base (a plan already checked: promoting
            further from it never takes back what it has).
        promotions: stop after this many (a point of the frontier's path).
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
    while target_sqnr_db is None or current < target_sqnr_db:
        if promotions is not None and len(plan.promotions) >= promotions:
            break
        best = None
        for block, i in chosen.items():
            here = options[block][i]
            for j in range(i + 1, len(options[block])):
                there = options[block][j]
                extra = there.weight_bytes - here.weight_bytes
                if budget_bytes is not None and size + extra > budget_bytes:
                    continue
                after = total - _noise(here.sqnr_db) + _noise(there.sqnr_db)
                gain = _db_of(after) - current
                score = gain / here.cost_to(there)
                if gain > 0 and (best is None or score > best[0]):
                    best = (score, block, j, extra)
        if best is None:
            break
        _, block, j, extra = best
        total += _noise(options[block][j].sqnr_db) - _noise(options[block][chosen[block]].sqnr_db)
        total = max(total, 0.0)
        chosen[block] = j
        size += extra
        current = predicted_sqnr_db(options, chosen)
        plan.promotions.append(Promotion(block, options[block][chosen[block]].level, current, size))
    plan.levels = {b: options[b][i].level for b, i in chosen.items()}
    plan.predicted_sqnr_db, plan.weight_bytes = current, size
    return plan
