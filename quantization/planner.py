"""Global treatment: choose a precision level per block from measured SQNR and size. Pure maths.

Quantization noise of different blocks is treated as independent and additive at the denoiser
output: if block b alone gives SQNR s_b (its *relative* SQNR), the model with several quantized
blocks has noise power sum_b 10^(-s_b / 10) relative to the signal. The greedy loop promotes,
one level at a time, the block whose promotion buys the most predicted SQNR per extra byte,
until a target SQNR is reached or the next promotion would break a size budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["BlockOption", "LevelChoice", "Promotion", "greedy_plan", "predicted_sqnr_db"]


@dataclass(frozen=True)
class BlockOption:
    """One precision level of one block: its relative SQNR (dB) and its weight bytes."""

    level: str
    sqnr_db: float
    weight_bytes: int


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


def predicted_sqnr_db(options: dict[str, list[BlockOption]], chosen: dict[str, int]) -> float:
    """End-to-end SQNR predicted from the blocks' relative SQNRs at the chosen level indices."""
    total = sum(_noise(options[b][i].sqnr_db) for b, i in chosen.items())
    return math.inf if total == 0 else -10.0 * math.log10(total)


def greedy_plan(
    options: dict[str, list[BlockOption]],
    *,
    target_sqnr_db: float | None = None,
    budget_bytes: int | None = None,
) -> LevelChoice:
    """Promote blocks greedily by predicted SQNR gain per extra byte.

    Args:
        options: per block, its levels from the base recipe (index 0) to the most precise.
        target_sqnr_db: stop as soon as the predicted end-to-end SQNR reaches this.
        budget_bytes: never exceed this total weight size.
    At least one of the two must be given; with both, whichever stops first wins.
    """
    if target_sqnr_db is None and budget_bytes is None:
        raise ValueError("give a target SQNR, a size budget, or both")
    chosen = {b: 0 for b in options}
    size = sum(opts[0].weight_bytes for opts in options.values())
    if budget_bytes is not None and size > budget_bytes:
        raise ValueError(f"the base recipe already needs {size} bytes > budget {budget_bytes}")
    current = predicted_sqnr_db(options, chosen)
    plan = LevelChoice({}, current, size)
    while target_sqnr_db is None or current < target_sqnr_db:
        best = None
        for block, i in chosen.items():
            if i + 1 >= len(options[block]):
                continue
            extra = options[block][i + 1].weight_bytes - options[block][i].weight_bytes
            if budget_bytes is not None and size + extra > budget_bytes:
                continue
            gain = predicted_sqnr_db(options, {**chosen, block: i + 1}) - current
            score = gain / max(extra, 1)
            if gain > 0 and (best is None or score > best[0]):
                best = (score, block, extra)
        if best is None:
            break
        _, block, extra = best
        chosen[block] += 1
        size += extra
        current = predicted_sqnr_db(options, chosen)
        plan.promotions.append(Promotion(block, options[block][chosen[block]].level, current, size))
    plan.levels = {b: options[b][i].level for b, i in chosen.items()}
    plan.predicted_sqnr_db, plan.weight_bytes = current, size
    return plan
