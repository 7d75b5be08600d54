"""pipelines.generate on the embedded models: schedulers, previews, edits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import generate, schedulers
from pipelines.edit import Edit, to_tensor
from pipelines.loader import load_pipeline

MODELS = Path(__file__).resolve().parents[1] / "models"
PROMPT = "a red seven on a black background"


@pytest.fixture(scope="module")
def t2i():
    pipe = load_pipeline(MODELS / "t2i-digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dit():
    pipe = load_pipeline(MODELS / "dit-digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, condition, seed=0, steps=8, **kw):
    return generate.run(
        pipe, [condition], [seed], num_inference_steps=steps, guidance_scale=4.0, **kw
    )


def test_preview_steps_are_evenly_spaced_before_the_last():
    assert generate.preview_steps(20, 2) == [7, 13]
    assert generate.preview_steps(20, 3) == [5, 10, 15]
    assert generate.preview_steps(3, 3) == [1, 2]  # fewer steps than previews asked
    assert generate.preview_steps(1, 3) == [] and generate.preview_steps(20, 0) == []


def test_scheduler_names_per_pipeline_kind():
    assert schedulers.names_for(False, "PNDMScheduler") == ["dpm++-2m", "ddim", "euler", "euler-a"]
    assert schedulers.names_for(False, "EulerDiscreteScheduler")[0] == "euler"
    assert schedulers.names_for(True, "DPMSolverMultistepScheduler") == ["dpm++-2m", "ddim"]
    assert schedulers.names_for(False, "FlowMatchEulerDiscreteScheduler") == []
    assert schedulers.steps_run(20, None) == 20 and schedulers.steps_run(20, 0.33) == 6


def test_every_scheduler_is_deterministic_and_the_folder_own_comes_back(t2i):
    native = t2i.scheduler
    first = _run(t2i, PROMPT).images
    for name in ("ddim", "euler", "euler-a"):
        a, b = _run(t2i, PROMPT, scheduler=name).images, _run(t2i, PROMPT, scheduler=name).images
        # euler-a draws noise at every step: from the request's generators, not torch's
        assert np.array_equal(a, b), name
        assert not np.array_equal(a, first), name
    assert np.array_equal(_run(t2i, PROMPT, scheduler=None).images, first)
    assert t2i.scheduler is native


def test_the_clean_prediction_formula_matches_ddim_own(t2i):
    schedulers.use(t2i, "ddim")
    scheduler = t2i.scheduler
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[3]
    out = scheduler.step(eps, t, sample)
    ours = generate.predicted_clean(scheduler, (out.prev_sample,), eps, t, sample)
    torch.testing.assert_close(ours, out.pred_original_sample, rtol=1e-4, atol=1e-4)
    schedulers.use(t2i, None)


def test_previews_approach_the_image_and_do_not_change_it(t2i, dit):
    for pipe, condition in ((t2i, PROMPT), (dit, 7)):
        plain = _run(pipe, condition, steps=12).images[0]
        got = []
        with_previews = _run(
            pipe,
            condition,
            steps=12,
            preview_at=[4, 8],
            on_preview=lambda k, step, pixels, got=got: got.append((k, step, pixels)),
        )
        assert np.array_equal(with_previews.images[0], plain)
        assert [(k, step) for k, step, _ in got] == [(0, 4), (1, 8)]
        assert got[0][2].shape == (1, 32, 32, 3) and got[0][2].dtype == np.uint8
        far, near = (np.abs(p[0].astype(int) - plain).mean() for _, _, p in got)
        assert near < far


def test_image_to_image_keeps_the_input_at_low_strength(t2i, dit):
    for pipe, condition in ((t2i, PROMPT), (dit, 7)):
        source = _run(pipe, condition, steps=12).images[0]
        vae = pipe.vae
        with torch.no_grad():
            z = vae.encode(to_tensor(source)).latent_dist.mean
            roundtrip = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        floor = np.abs(np.rint(roundtrip * 255) - source).mean()  # what the VAE alone loses
        steps = []
        low = _run(
            pipe,
            condition,
            seed=3,
            steps=20,
            edit=Edit(source, 0.1),
            on_step=lambda s, n, steps=steps: steps.append((s, n)),
        )
        assert steps[-1] == (2, 2)  # 0.1 of 20 steps run
        high = _run(pipe, condition, seed=3, steps=20, edit=Edit(source, 1.0))
        low_change = np.abs(low.images[0].astype(int) - source).mean()
        high_change = np.abs(high.images[0].astype(int) - source).mean()
        assert low_change < floor + 3 < high_change, (low_change, floor, high_change)


def test_inpainting_changes_the_masked_half_and_dit_refuses_it(t2i, dit):
    source = _run(t2i, PROMPT, steps=12).images[0]
    mask = np.zeros((32, 32), bool)
    mask[:, 16:] = True
    out = _run(
        t2i, "a blue one on a black background", seed=2, steps=12, edit=Edit(source, 1.0, mask)
    )
    change = np.abs(out.images[0].astype(int) - source).mean(axis=2)
    assert change[mask].mean() > 1.5 * change[~mask].mean()
    with pytest.raises(ValueError, match="does not inpaint"):
        _run(dit, 7, edit=Edit(source, 1.0, mask))


def test_compiling_a_denoiser_twice_keeps_the_compiled_module(dit):
    from pipelines.loader import compile_denoiser

    original = dit.transformer
    try:
        compile_denoiser(dit)
        compiled = dit.transformer
        assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
        compile_denoiser(dit)  # a worker's load compiled it, bench.report asks again
        assert dit.transformer is compiled and compiled.config is original.config
    finally:
        dit.register_modules(transformer=original)
