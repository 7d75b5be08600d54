"""bench.quantize_cost's command lines and its reading of a manifest's estimate against the
seconds and calls the run measured (no model runs here)."""

from pathlib import Path

from bench import quantize_cost as qc

WORK = {
    "estimate": {
        "effort": {"prompts": 8, "unit": "module"},
        "stages": [
            {"name": "calibration", "work": "1 denoiser call(s) at batch 16", "seconds": 2.0},
            {"name": "trajectory", "work": "50 FP denoiser calls", "seconds": 30.0},
            {"name": "sensitivity", "work": "28 blocks x 3 levels", "seconds": 60.0},
            {"name": "detail", "work": "accumulated SQNR", "seconds": 8.0},
        ],
        "seconds": 100.0,
    },
    "actual": {"probe": 5.0, "calibration": 2.5, "trajectory": 40.0, "sensitivity": 50.0},
    "calls": {"probe": {"denoiser": 3}, "sensitivity": {"denoiser": 0, "blocks": 840}},
}


def test_the_quantize_command_is_the_readmes_and_adds_only_flags_given():
    folder, out = Path("/w/pipeline"), Path("/w/art-w8a8")
    dit = qc.quantize_args(folder, "w8a8", out, qc.conditions_args(None), 50)
    assert qc.shown(dit) == (
        "python -m quantization quantize /w/pipeline --classes all --steps 50 "
        "--recipe w8a8 --out /w/art-w8a8"
    )
    sd = qc.quantize_args(
        folder,
        "w4a8-sqnr",
        out,
        qc.conditions_args(Path("/w/prompts.txt")),
        4,
        max_minutes=5,
        device="cuda",
        dtype="bf16",
    )
    assert sd[3:6] == ["/w/pipeline", "--prompts", "/w/prompts.txt"]
    assert sd[-6:] == ["--max-minutes", "5", "--device", "cuda", "--dtype", "bf16"]


def test_the_replan_plans_from_the_artifacts_analysis_with_the_same_conditions():
    args = qc.replan_args(
        Path("/w/pipeline"),
        Path("/w/art-w8a8/analysis"),
        35.0,
        Path("/w/art-w8a8-replan"),
        ["--classes", "all"],
        50,
    )
    assert qc.shown(args) == (
        "python -m quantization quantize /w/pipeline --classes all --steps 50 "
        "--analysis /w/art-w8a8/analysis --target-sqnr 35 --out /w/art-w8a8-replan"
    )
    assert "--device" not in args and "--recipe" not in args


def test_stages_pair_estimate_and_measurement_in_run_order():
    rows = {r["stage"]: r for r in qc.stage_rows(WORK)}
    assert list(rows) == ["probe", "calibration", "trajectory", "sensitivity", "detail"]
    assert rows["probe"]["estimated_s"] is None and rows["probe"]["denoiser_calls"] == 3
    assert rows["trajectory"]["error"] == -0.25  # 30 s estimated, 40 s taken
    assert rows["sensitivity"]["error"] == 0.2
    assert rows["sensitivity"]["block_calls"] == 840
    assert rows["detail"]["actual_s"] is None and rows["detail"]["error"] is None
    assert rows["calibration"]["work"] == "1 denoiser call(s) at batch 16"


def test_a_uniform_recipes_check_is_matched_to_the_stage_the_run_times_and_calls_may_be_absent():
    work = {
        "estimate": {"stages": [{"name": "check", "work": "8 images", "seconds": 12.0}]},
        "actual": {"check images": 10.0},
    }
    [row] = qc.stage_rows(work)
    assert row["stage"] == "check images"
    assert row["error"] == 0.2
    assert row["denoiser_calls"] is None


def test_the_estimate_is_judged_against_the_process_and_against_the_stages():
    errors = qc.estimate_errors(WORK, wall_s=125.0)
    assert errors["stages_s"] == 97.5  # the probe included, the unrun detail not
    assert errors["estimated_stages_s"] == 92.5
    assert errors["error_vs_wall"] == -0.2
    assert errors["error_vs_stages"] == round((100 - 97.5) / 97.5, 3)
    assert qc.estimate_errors({}, 10.0)["error_vs_wall"] is None  # a replan has no estimate


def test_the_markdown_table_has_a_row_per_stage():
    table = qc.markdown_table(qc.stage_rows(WORK)).splitlines()
    assert table[0].startswith("| stage | estimated s | took s | error")
    assert len(table) == 2 + 5
    assert table[4].startswith("| trajectory | 30.0 | 40.0 | -0.25 |")


def test_sd15_calibrates_on_32_distinct_prompts():
    assert len(set(qc.PROMPTS)) == 32
    assert all(len(p) < 60 for p in qc.PROMPTS)  # well inside 77 tokens
