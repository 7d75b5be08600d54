"""A planner that knows speed: per-layer latencies timed once per device and cached, priced
beside bytes, and the reasons it gives for each unit's level."""

import json
import math

import pytest
import torch

from quantization import backends
from quantization.analysis import find_units
from quantization.api import analyze_denoiser
from quantization.backends import x86_kernels
from quantization.latency import Latencies, LatencyCache, device_key, input_shapes
from quantization.plan import SPEED_MIN_SHARE, BlockOption, explain, greedy_plan
from quantization.table import SensitivityTable
from quantization.types import LayerSpec, Recipe, get_recipe, level_spec
from tests import tiny


def _unit(base_db, base_ms, token_db, token_ms, float_ms, nbytes=100):
    return [
        BlockOption("w8a8", base_db, nbytes, 0, base_ms),
        BlockOption("w8a8t", token_db, nbytes, 0, token_ms),
        BlockOption("float", math.inf, 4 * nbytes, 4 * nbytes, float_ms),
    ]


def test_with_latencies_a_promotion_costs_its_time_and_bytes():
    # Two units gain the same from per-token activations; one pays 10x the time for it.
    options = {
        "cheap": _unit(20.0, 1.0, 40.0, 1.1, 4.0),
        "dear": _unit(20.0, 1.0, 40.0, 2.0, 4.0),
    }
    plan = greedy_plan(options, target_sqnr_db=19.0)
    assert [p.block for p in plan.promotions] == ["cheap"]
    assert plan.levels == {"cheap": "w8a8t", "dear": "w8a8"}
    p = plan.promotions[0]
    assert (p.from_level, p.to_level, p.added_bytes) == ("w8a8", "w8a8t", 0)
    assert p.added_ms == pytest.approx(0.1) and p.gain_db > 0
    # without latencies the same options are priced in bytes only: per token costs nothing,
    # so the tie is broken by order, not by time
    blind = {
        b: [BlockOption(o.level, o.sqnr_db, o.weight_bytes, o.float_matmul_bytes) for o in opts]
        for b, opts in options.items()
    }
    assert greedy_plan(blind, target_sqnr_db=19.0).promotions[0].added_ms is None


def test_float_that_is_faster_than_int8_costs_only_its_bytes():
    # "small": float is faster than its int8 (a layer too small for int8 to pay); "big":
    # float is slower. Same gain, same bytes: the one that also saves time goes first.
    options = {
        "big": _unit(20.0, 1.0, 21.0, 1.5, 4.0),
        "small": _unit(20.0, 1.0, 21.0, 1.5, 0.5),
    }
    plan = greedy_plan(options, target_sqnr_db=22.0)
    assert plan.promotions[0].block == "small" and plan.promotions[0].to_level == "float"
    assert plan.promotions[0].added_ms == pytest.approx(-0.5)


def test_explain_says_why_each_unit_is_where_it_is():
    options = {
        "a": _unit(18.0, 1.0, 35.0, 1.2, 4.0),
        "b": _unit(40.0, 1.0, 45.0, 1.2, 4.0),
    }
    choice = greedy_plan(options, target_sqnr_db=30.0)
    why = explain(options, choice, 30.0)
    assert choice.levels == {"a": "w8a8t", "b": "w8a8"}
    assert why["a"].startswith("w8a8t, promoted from the base (18.0 dB alone, 1.000 ms)")
    assert "#1: w8a8 -> w8a8t (35.0 dB alone, 1.200 ms)" in why["a"]
    assert "+0.200 ms" in why["a"] and "+0 bytes" in why["a"]
    assert why["b"].startswith("w8a8, the base (40.0 dB alone, 1.000 ms): the plan met its 30")
    options["b"] = [options["b"][0], options["b"][2]]  # float only: 4x the bytes
    capped = greedy_plan(options, target_sqnr_db=60.0, budget_bytes=200)
    assert capped.levels["b"] == "w8a8"
    assert "the budget stopped the plan" in explain(options, capped, 60.0)["b"]


def test_levels_are_checked_by_name():
    assert level_spec("w8a8t", None, "tensor") == LayerSpec("int8", "int8", None, "token")
    with pytest.raises(ValueError, match="level must be one of"):
        level_spec("w9a9", None, "tensor")
    with pytest.raises(ValueError, match="unknown levels"):
        Recipe("bad", "", "int8", "int8", levels=("w8a8", "w7a8"))
    assert level_spec("bf16", None, "tensor") == LayerSpec("bf16")
    assert get_recipe("w8a8-static-sqnr").levels == ("w8a8", "w8a8t", "bf16", "float")


def test_timings_are_cached_per_device_and_reused(tmp_path):
    model = tiny.dit()
    impl = backends.get("x86")
    layers = [n for u in find_units(model, impl.LAYERS, "module") for n in u.layers]
    call = tiny.calls("dit", batch=4)[0]
    shapes = input_shapes(model, layers, call)
    assert shapes["proj_out_2"][0] == 4  # (B, tokens, C)
    halved = input_shapes(model, layers, call, batch=2)
    assert halved["proj_out_2"] == (2, *shapes["proj_out_2"][1:])

    path = tmp_path / "latency.json"
    first = Latencies(model, shapes, impl, LatencyCache.open(path))
    spec = LayerSpec("int8", "int8", None, "tensor")
    ms = first.layer_ms("proj_out_2", spec)
    assert ms > 0 and first.timed == 1
    # the two ff layers of block 0 and 1 have one shape: timed once
    first.unit_ms(("transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.2"), {})
    assert first.timed == 2
    first.cache.save()
    saved = json.loads(path.read_text())
    assert list(saved) == [device_key("x86")]
    # the kernels the x86 backend picked for this CPU are part of the key: timings of the
    # bf16 level in software bf16 are not reused once it multiplies in float32
    assert device_key("x86").endswith(f"| x86 ({x86_kernels.KERNELS})")

    again = Latencies(model, shapes, impl, LatencyCache.open(path))
    assert again.missing([("proj_out_2", spec), ("proj_out_2", None)]) == 1
    assert again.layer_ms("proj_out_2", spec) == ms and again.timed == 0
    # other threads (or another CPU, torch or backend) are another device: timed anew
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other = Latencies(model, shapes, impl, LatencyCache.open(path))
        assert other.device != again.device
        other.layer_ms("proj_out_2", spec)
        assert other.timed == 1
    finally:
        torch.set_num_threads(threads)
    # a torn cache file is timed again, not an error
    path.write_text('{"x": ')
    assert LatencyCache.open(path).entries == {}


def test_the_speed_priced_recipe_times_every_unit_at_every_level(tmp_path):
    model, calls = tiny.dit(), tiny.calls("dit")
    cache = LatencyCache.open(tmp_path / "latency.json")
    done = analyze_denoiser(
        model, "w8a8-static-sqnr", calls[:1], calls, target_sqnr_db=80.0, latency_cache=cache
    )
    table = done.table
    assert table.measured_on["latency"] == device_key("x86")
    assert all(e.latency_ms is not None and e.latency_ms > 0 for e in table.entries.values())
    # it reaches per-token and float levels where the target asks for them
    assert set(done.choice.levels.values()) - {"w8a8"}
    assert all(p.added_ms is not None for p in done.choice.promotions)
    # the table keeps the latencies through its JSON
    again = SensitivityTable.from_json(json.loads(json.dumps(table.to_json())))
    assert {k: e.latency_ms for k, e in again.entries.items()} == {
        k: e.latency_ms for k, e in table.entries.items()
    }
    assert (tmp_path / "latency.json").is_file()
    # a second analysis on this device times nothing
    cached = LatencyCache.open(tmp_path / "latency.json")
    n = sum(len(v) for v in cached.entries.values())
    analyze_denoiser(
        model, "w8a8-static-sqnr", calls[:1], calls, target_sqnr_db=80.0, latency_cache=cached
    )
    assert sum(len(v) for v in cached.entries.values()) == n


def test_once_the_target_is_met_faster_levels_are_taken_within_the_budget():
    # The target is met at the base; "small"'s float is faster than its int8 (and exact),
    # "big"'s is slower: only "small" is promoted, and only while the budget allows.
    options = {
        "big": _unit(40.0, 1.0, 41.0, 1.5, 4.0),
        "small": _unit(40.0, 1.0, 41.0, 1.5, 0.5),
    }
    plain = greedy_plan(options, target_sqnr_db=30.0)
    assert plain.promotions == []
    fast = greedy_plan(options, target_sqnr_db=30.0, save_time=True)
    assert fast.levels == {"big": "w8a8", "small": "float"}
    (p,) = fast.promotions
    assert p.reason == "saves time" and p.added_ms == pytest.approx(-0.5)
    assert "taken for speed after the target" in explain(options, fast, 30.0)["small"]
    # no room in the budget for float's bytes: nothing is taken
    tight = greedy_plan(options, target_sqnr_db=30.0, budget_bytes=200, save_time=True)
    assert tight.promotions == []
    # without latencies there is no time to save
    blind = {
        b: [BlockOption(o.level, o.sqnr_db, o.weight_bytes) for o in v] for b, v in options.items()
    }
    assert greedy_plan(blind, target_sqnr_db=30.0, save_time=True).promotions == []


def test_a_saving_too_small_for_the_timing_proxy_is_not_taken_for_speed():
    # 100 units of 1 ms at the base: the plan takes 100 ms; "tiny" would save 0.1 % of it,
    # "some" 1 %: only "some" goes float for speed.
    options = {f"u{i}": _unit(60.0, 1.0, 61.0, 1.5, 2.0) for i in range(98)}
    options["tiny"] = _unit(60.0, 1.0, 61.0, 1.5, 0.9)
    options["some"] = _unit(60.0, 1.0, 61.0, 1.5, 0.0)
    fast = greedy_plan(options, target_sqnr_db=30.0, save_time=True)
    assert [p.block for p in fast.promotions] == ["some"]
    assert 0.1 < SPEED_MIN_SHARE * 100 < 1.0
