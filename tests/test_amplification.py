"""bench.amplification's building blocks: the perturbations it measures, and the schedule factor."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from bench.amplification import HEAD, noise_to_signal_at_t_max, quantized, rounded
from quantization import backends
from tests import tiny


def test_head_float_leaves_exactly_the_output_head_unquantized():
    model = tiny.dit()
    full = quantized(model, "w8a16", tiny.calls("dit"))
    headless = quantized(model, "w8a16", tiny.calls("dit"), head_float=True)
    full_layers = set(backends.get("quanto").layer_specs(full))
    headless_layers = set(backends.get("quanto").layer_specs(headless))
    dropped = full_layers - headless_layers
    assert dropped and headless_layers < full_layers
    assert all(name.split(".")[0] in HEAD for name in dropped)
    quanto = backends.get("quanto")
    assert not any(quanto.is_quantized(m) for m in model.modules())  # FP untouched


def test_rounded_weights_go_through_the_dtype_and_leave_the_original_alone():
    model = tiny.dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = rounded(model, torch.bfloat16)
    for (name, p), q in zip(model.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(p, before[name])
        assert q.dtype == p.dtype
        assert torch.equal(q, p.to(torch.bfloat16).float())


@pytest.mark.parametrize(
    ("schedule", "start", "end"),
    [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)],
)
def test_sigma_over_alpha_at_t_max_follows_the_schedule(schedule, start, end):
    s = DPMSolverMultistepScheduler(beta_schedule=schedule, beta_start=start, beta_end=end)
    abar = float(s.alphas_cumprod[-1])
    assert noise_to_signal_at_t_max(s) == pytest.approx(math.sqrt((1 - abar) / abar))
    # DiT's linear schedule leaves ~10x less signal at t = T than Stable Diffusion's
    assert noise_to_signal_at_t_max(s) > (100 if schedule == "linear" else 10)
