"""Analyze once, plan many; resume; the plan of work: on the tiny DiT pipeline and in numbers."""

import re
from dataclasses import replace

import pytest

from quantization import QuantizeOptions, quantize
from quantization.api import analyze_pipeline, quantize_from_analysis
from quantization.artifact import save_analysis
from quantization.calibration import Conditions
from quantization.cost import (
    LADDER,
    Effort,
    Shape,
    Timings,
    cheapest_within,
    choose_effort,
    estimate,
)
from quantization.measure import Measurer
from quantization.plan import predicted_sqnr_db
from tests import tiny

CLASSES = Conditions("classes", (0, 1, 2, 3, 4, 5, 6, 7), "--classes")
FAST = QuantizeOptions(
    num_inference_steps=3,
    guidance_scale=2.0,
    calibration_prompts=4,
    prompts=2,
    conditions=CLASSES,
    checks=1,
    detail=False,
)


def _measured_rows(table) -> int:
    return sum(1 for (_, level) in table.entries if level != "float")


def _watch(monkeypatch, method: str, seen: list[str], stop_after: int | None = None) -> None:
    """Patch ``Measurer.<method>(unit, ...)`` to note each unit it measures, and to raise what
    SIGINT raises in the main thread once ``stop_after`` units are noted."""
    original = getattr(Measurer, method)

    def watched(self, unit, *args, **kwargs):
        if stop_after is not None and len(seen) == stop_after:
            raise KeyboardInterrupt
        seen.append(unit.name)
        return original(self, unit, *args, **kwargs)

    monkeypatch.setattr(Measurer, method, watched)


def test_an_interrupted_analysis_resumes_and_gives_the_same_plan(tmp_path, monkeypatch):
    pipe = tiny.dit_pipeline()
    whole = analyze_pipeline(
        pipe, "w4a8-sqnr", options=replace(FAST, analysis_dir=tmp_path / "whole"), source="t"
    )
    rows = _measured_rows(whole.table)
    measured: list[str] = []
    options = replace(FAST, analysis_dir=tmp_path / "a")
    with monkeypatch.context() as patch:
        _watch(patch, "unit", measured, stop_after=rows // 2)
        with pytest.raises(KeyboardInterrupt):
            analyze_pipeline(pipe, "w4a8-sqnr", options=options, source="t")
    assert len(measured) == rows // 2
    with pytest.raises(ValueError, match="--resume"):  # a journal is never overwritten
        analyze_pipeline(pipe, "w4a8-sqnr", options=options, source="t")
    measured.clear()
    _watch(monkeypatch, "unit", measured)
    again = analyze_pipeline(pipe, "w4a8-sqnr", options=replace(options, resume=True), source="t")
    assert len(measured) == rows - rows // 2  # only what was not measured before
    assert again.plan == whole.plan
    assert again.table.to_json()["entries"] == whole.table.to_json()["entries"]
    with pytest.raises(ValueError, match=r"other settings.*prompts"):
        analyze_pipeline(
            pipe, "w4a8-sqnr", options=replace(options, resume=True, prompts=3), source="t"
        )


def test_an_analysis_interrupted_in_its_checks_resumes_to_the_same_plan(tmp_path, monkeypatch):
    """Units a check blamed and measured end to end before the interruption are taken from
    the journal in the round they were measured in, not before the first check."""
    pipe = tiny.dit_pipeline()
    sampled = Measurer.end_to_end

    def pessimistic(self, model):  # checks read 10 dB low: two rounds refine
        db, latents = sampled(self, model)
        return db - 10.0, latents

    monkeypatch.setattr(Measurer, "end_to_end", pessimistic)
    refining = replace(FAST, checks=3, refine=2, target_sqnr_db=35.0)
    whole = analyze_pipeline(
        pipe, "w4a8-sqnr", options=replace(refining, analysis_dir=tmp_path / "w"), source="t"
    )
    assert len(whole.table.end_to_end) >= 3  # refined in more than one round
    refined: list[str] = []
    options = replace(refining, analysis_dir=tmp_path / "a")
    with monkeypatch.context() as patch:
        _watch(patch, "unit_end_to_end", refined, stop_after=3)
        with pytest.raises(KeyboardInterrupt):
            analyze_pipeline(pipe, "w4a8-sqnr", options=options, source="t")
    refined.clear()
    _watch(monkeypatch, "unit_end_to_end", refined)
    resumed = replace(options, resume=True)
    again = analyze_pipeline(pipe, "w4a8-sqnr", options=resumed, source="t")
    assert again.plan == whole.plan
    assert len(refined) == len(whole.table.end_to_end) - 3  # the three kept are not measured
    refined.clear()
    once_more = analyze_pipeline(pipe, "w4a8-sqnr", options=resumed, source="t")
    assert once_more.plan == whole.plan and refined == []  # a complete journal: nothing again


def test_a_saved_analysis_plans_to_any_target_without_measuring(tmp_path, monkeypatch):
    pipe = tiny.dit_pipeline()
    done = analyze_pipeline(pipe, "w8a8", options=FAST, source="t")
    assert done.analysis is not None and done.table is not None
    save_analysis(tmp_path, done.table, done.analysis, **done._saved)
    assert (tmp_path / "frontier.md").is_file() and (tmp_path / "frontier.png").is_file()
    # the saved table predicts what its last check measured, so a re-plan starts from it
    last = done.table.checks[-1]
    options = done.table.options()
    at = {u: [o.level for o in options[u]].index(lv) for u, lv in last.levels.items()}
    assert last.measured_db is not None
    assert predicted_sqnr_db(options, at) == pytest.approx(last.measured_db, abs=0.01)

    def never(*args, **kwargs):
        raise AssertionError("a saved analysis is planned from, not measured again")

    monkeypatch.setattr(Measurer, "unit", never)
    monkeypatch.setattr(Measurer, "unit_end_to_end", never)
    notes: list[str] = []

    class Notes:
        def __getattr__(self, name):
            from quantization.progress import Silent

            return getattr(self.__dict__.setdefault("silent", Silent()), name)

        def note(self, message):
            notes.append(message)

    plans = {}
    for target in (10.0, 60.0):
        options = replace(FAST, target_sqnr_db=target, budget_ratio=2.0)
        result = quantize_from_analysis(pipe, tmp_path, options=options, progress=Notes())
        plans[target] = result
        assert result.measured["sqnr_latent_db"] is not None  # checked end to end
    assert any("no new sensitivity measurement" in n for n in notes)
    low, high = plans[10.0], plans[60.0]
    assert low.measured["predicted_sqnr_db"] < high.measured["predicted_sqnr_db"]
    frontier = done.analysis.frontier
    bytes_ = [p["denoiser_bytes"] for p in frontier]
    assert bytes_ == sorted(bytes_) and len(frontier) > 2  # the greedy path only adds bytes
    point = quantize_from_analysis(pipe, tmp_path, options=FAST, point=2)
    assert point.measured["frontier_point"] == 2
    with pytest.raises(ValueError, match="--point"):
        quantize_from_analysis(pipe, tmp_path, options=FAST, point=len(frontier))
    # the check is costed from a timed quantized call before it samples, and skipped with
    # its reason when it does not fit the time left
    notes.clear()
    budgeted = replace(FAST, target_sqnr_db=10.0, budget_ratio=2.0, max_minutes=1e-6)
    skipped = quantize_from_analysis(pipe, tmp_path, options=budgeted, progress=Notes())
    assert "sqnr_latent_db" not in skipped.measured
    assert any(re.search(r"check skipped: ~\d+ s does not fit", n) for n in notes), notes
    notes.clear()
    budgeted = replace(FAST, target_sqnr_db=60.0, budget_ratio=1.0)
    quantize_from_analysis(pipe, tmp_path, options=budgeted, progress=Notes())
    assert any("not predicted within the budget" in n for n in notes), notes


def _timings(call: float = 2.0) -> Timings:
    blocks = {f"b{i}": call / 5 for i in range(4)}
    return Timings(2, call, 0.0, blocks, {"w8a8": 0.5, "w8a16": 1.2}, 0.5, 1.0)


def _shape(steps: int = 50) -> Shape:
    return Shape(
        steps=steps,
        guided=True,
        units={
            "module": [f"b{i}" for i in range(4) for _ in range(5)],
            "block": ["b0", "b1", "b2", "b3"],
        },
        levels=2,
        static=False,
        multi_step_calibration=False,
        planned=True,
        denoiser_gb=3.0,
        check_images=0,
    )


def test_the_ladder_takes_the_most_thorough_effort_that_fits_and_refuses_what_cannot():
    shape, t = _shape(), _timings()
    costs = [estimate(rung, shape, t).seconds for rung in LADDER]
    assert costs == sorted(costs, reverse=True)  # each rung cheaper than the one above
    work, tried = choose_effort(shape, t, max_minutes=costs[3] / 60 + 0.01)
    assert work.effort == LADDER[3] and len(tried) == 4
    forced, _ = choose_effort(shape, t, 1e6, forced={"scope": "block", "prompts": 1})
    assert forced.effort is not None and forced.effort.scope == "block"
    with pytest.raises(ValueError, match=r"no effort fits 0.01 minutes.*--max-minutes \d+"):
        choose_effort(shape, t, 0.01)
    # past a default budget (not one the user set), the cheapest rung if it fits a wider one
    cheapest = cheapest_within(shape, t, costs[-1] / 60 + 0.01)
    assert cheapest is not None and cheapest.effort == LADDER[-1]
    assert cheapest_within(shape, t, costs[-1] / 60 - 0.01) is None


def test_the_estimate_counts_calls_per_stage():
    effort = Effort(2, 8, "block", "block", 4, 0, 1, False)
    t = _timings(call=2.0)
    work = {s.name: s.seconds for s in estimate(effort, _shape(), t).stages}
    # 50 FP calls at batch 4 (2 prompts, guided): twice the probe's batch of 2
    assert work["trajectory"] == pytest.approx(50 * 4.0)
    # 4 blocks (0.4 s each at batch 2, twice that at 4) at each level's factor (0.5, 1.2), on
    # 8 recorded steps, plus a copy of the whole denoiser per level (3 GB at 1 s/GB)
    assert work["sensitivity"] == pytest.approx(4 * 0.4 * 2 * (0.5 + 1.2) * 8 + 2 * 3.0)
    assert set(work) == {"trajectory", "sensitivity", "checks", "save"}


def test_quantize_needs_no_detail_but_analyze_has_it():
    pipe = tiny.dit_pipeline()
    options = replace(FAST, detail=None)
    q = quantize(pipe, "w8a8", options=options, source="t")
    a = analyze_pipeline(pipe, "w8a8", options=options, source="t")
    assert q.analysis is not None and not q.analysis.accumulated_sqnr_db
    assert a.analysis is not None and a.analysis.accumulated_sqnr_db
    assert a.analysis.treatment_gains["uniform_base_sqnr_db"] is not None
