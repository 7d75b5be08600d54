import math

import pytest

from quantization.plan import BlockOption, greedy_plan, predicted_sqnr_db

LEVELS = ("w4a8", "w8a8", "float")


def _options(sqnrs: dict[str, tuple[float, float, float]], sizes=(1, 2, 8)):
    return {
        b: [BlockOption(level, s, size) for level, s, size in zip(LEVELS, v, sizes, strict=True)]
        for b, v in sqnrs.items()
    }


def test_noise_of_independent_blocks_adds_up():
    options = _options({"a": (20.0, 30.0, math.inf), "b": (20.0, 30.0, math.inf)})
    assert predicted_sqnr_db(options, {"a": 0, "b": 0}) == pytest.approx(20 - 10 * math.log10(2))
    assert predicted_sqnr_db(options, {"a": 2, "b": 2}) == math.inf


def test_the_least_sqnr_block_is_promoted_first():
    options = _options(
        {
            "good": (30.0, 40.0, math.inf),
            "worst": (10.0, 25.0, math.inf),
            "mid": (18.0, 30.0, math.inf),
        }
    )
    plan = greedy_plan(options, target_sqnr_db=17.0)
    assert [p.block for p in plan.promotions][:2] == ["worst", "mid"]
    assert plan.predicted_sqnr_db >= 17.0
    assert plan.levels["good"] == "w4a8"


def test_gain_is_weighed_against_extra_bytes():
    # same noise, but promoting "big" costs ten times more bytes
    options = {
        "small": [BlockOption("w4a8", 15.0, 10), BlockOption("w8a8", 30.0, 20)],
        "big": [BlockOption("w4a8", 15.0, 100), BlockOption("w8a8", 30.0, 200)],
    }
    plan = greedy_plan(options, target_sqnr_db=11.0)
    assert plan.promotions == []  # base: 15 dB twice -> 12 dB, the target is met
    plan = greedy_plan(options, target_sqnr_db=14.0)
    assert [p.block for p in plan.promotions] == ["small"]


def test_budget_is_never_exceeded():
    options = _options({"a": (10.0, 20.0, 40.0), "b": (12.0, 22.0, 42.0)})
    plan = greedy_plan(options, budget_bytes=5)
    assert plan.weight_bytes <= 5
    assert plan.levels == {"a": "w8a8", "b": "w8a8"}
    with pytest.raises(ValueError, match="budget"):
        greedy_plan(options, budget_bytes=1)
    with pytest.raises(ValueError, match="target"):
        greedy_plan(options)


def test_float_activations_are_not_free_and_levels_can_be_skipped():
    # Float activations add no byte but give up the int8 matmul: counted at the weights they
    # multiply, they do not all go before a cheap weight promotion that buys more.
    options = {
        "head": [
            BlockOption("w8a8", 20.0, 10),
            BlockOption("w8a16", 21.0, 10, 40),
            BlockOption("float", math.inf, 40, 40),
        ],
        **{
            f"b{i}": [
                BlockOption("w8a8", 40.0, 100),
                BlockOption("w8a16", 41.0, 100, 400),
                BlockOption("float", math.inf, 400, 400),
            ]
            for i in range(4)
        },
    }
    plan = greedy_plan(options, target_sqnr_db=30.0)
    # the head jumps straight to float (w8a16 buys it 1 dB, float removes its noise)
    assert plan.promotions[0].block == "head" and plan.promotions[0].to_level == "float"
    assert plan.levels == {"head": "float", **{f"b{i}": "w8a8" for i in range(4)}}
    assert plan.predicted_sqnr_db >= 30.0
