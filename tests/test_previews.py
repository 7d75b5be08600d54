"""Previews: the clean latents each sampler predicts, recovered from latents made of a known
x0, and decoded as each family's pipeline decodes its last ones; what each pipeline class is
offered (``pipelines.capabilities``) against what diffusers and our code run."""

from __future__ import annotations

import inspect
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    _get_task_class,
)

from pipelines import capabilities, generate
from pipelines.edit import Edit
from tests import families

SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _pair(shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _step(scheduler, output, t, sample):
    """One step as the pipelines take it (``return_dict=False``, a generator where asked)."""
    extra = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra["generator"] = torch.Generator().manual_seed(1)
    return scheduler.step(output, t, sample, return_dict=False, **extra)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", sorted(capabilities.DDPM_SCHEDULERS))
def test_ddpm_schedule_samplers_give_back_the_clean_latents(name, kind):
    cls = getattr(diffusers, name)
    config = dict(SD_SCHEDULE, prediction_type=kind)
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        config["clip_sample"] = False  # latents are not in [-1, 1] (pipelines.schedulers)
    scheduler = cls(**config)
    scheduler.set_timesteps(6)
    x0, eps = _pair()
    checked = 0
    for t in scheduler.timesteps:  # in turn: the samplers count their steps
        # KDPM2's second passes run at interpolated timesteps, off the alphas_cumprod table
        a = scheduler.alphas_cumprod[int(t)]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        output = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        # sigma-space samplers (Euler, LMS, Heun) step on x_t * sqrt(1 + sigma^2)
        sample = noisy / scheduler.scale_model_input(torch.ones(()), t)
        out = _step(scheduler, output, t, sample)
        if float(t).is_integer():
            clean = generate.predicted_clean(scheduler, out, output, t, sample)
            torch.testing.assert_close(clean, x0, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked >= 6


def test_dit_style_step_output_gives_back_the_clean_latents():
    """DiTPipeline takes the step's output object, not a tuple."""
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(10)
    x0, eps = _pair()
    t = scheduler.timesteps[3]
    a = scheduler.alphas_cumprod[int(t)]
    sample = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = scheduler.step(eps, t, sample)
    torch.testing.assert_close(generate.predicted_clean(scheduler, out, eps, t, sample), x0)


FLOW_SCHEDULERS = {
    "sd3": ({"shift": 3.0}, {}),
    "flux": (
        {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
        {"mu": 0.8},
    ),
}


@pytest.mark.parametrize("start", [0, 3], ids=["generation", "image-to-image"])
@pytest.mark.parametrize("family", sorted(FLOW_SCHEDULERS))
def test_flow_matching_gives_back_the_clean_latents_at_every_step(family, start):
    """x_t = (1 - sigma) x0 + sigma * noise and v = noise - x0: the prediction is x0 at each
    step (the sigma of that very step), and the last step, to sigma 0, lands on it."""
    config, timesteps = FLOW_SCHEDULERS[family]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(6, **timesteps)
    scheduler.set_begin_index(start)  # as an edit starts part-way
    x0, noise = _pair()
    velocity = noise - x0
    for k in range(start, 6):
        sigma = scheduler.sigmas[k]
        sample = (1 - sigma) * x0 + sigma * noise
        t = scheduler.timesteps[k]
        out = _step(scheduler, velocity, t, sample)
        clean = generate.predicted_clean(scheduler, out, velocity, t, sample)
        torch.testing.assert_close(clean, x0, atol=1e-5, rtol=1e-5)
    assert scheduler.sigmas[-1] == 0
    torch.testing.assert_close(out[0], clean)  # the scheduler's own step to sigma 0


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    return {f: families.build(f, folder / f) for f in families.FAMILIES}


def _sample(pipe, family, preview_at, **kw):
    condition = 7 if family == "dit" else families.PROMPTS[0]
    got = []
    out = generate.run(
        pipe,
        [condition],
        [3],
        num_inference_steps=kw.pop("steps", 2),
        guidance_scale=4.0,
        height=32,
        width=32,
        preview_at=preview_at,
        on_preview=lambda k, step, pixels: got.append(pixels),
        **kw,
    )
    return out.images, got


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_a_preview_after_the_last_step_is_the_image(pipes, family):
    """Every family's last step lands on its predicted clean latents (flow matching, DPM++ and
    Euler step to sigma 0), so a preview made there is the image decoded by the pipeline:
    Flux's latents unpacked, SD3's and Flux's shifted, PixArt's resized from its bin."""
    images, previews = _sample(pipes[family], family, [1, 2])
    assert [p.shape for p in previews] == [(1, 32, 32, 3)] * 2 and images.shape == (1, 32, 32, 3)
    assert np.abs(previews[1].astype(int) - images).max() <= 1  # DiT scales by 1/f, we by /f
    assert not np.array_equal(previews[0], images)
    if capabilities.IMAGE_TO_IMAGE.get(type(pipes[family]).__name__):
        edit = Edit(images[0], 0.5)  # 2 of 4 steps, from the noised image
        edited, previews = _sample(pipes[family], family, [2], steps=4, edit=edit)
        assert np.abs(previews[0].astype(int) - edited).max() <= 1


def test_a_sampler_without_a_clean_prediction_is_refused_previews(tmp_path):
    pipe = families.build("sd3", tmp_path)
    pipe.scheduler = diffusers.FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    assert not capabilities.capabilities(
        type(pipe).__name__, type(pipe.scheduler).__name__
    ).previews
    with pytest.raises(ValueError, match="makes no previews"):
        _sample(pipe, "sd3", [1])
    assert _sample(pipe, "sd3", [])[0].shape == (1, 32, 32, 3)  # it still generates


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_capabilities_are_what_diffusers_and_our_code_run(pipes, family):
    pipe = pipes[family]
    name = type(pipe).__name__
    offered = capabilities.capabilities(name, type(pipe.scheduler).__name__)
    for table, mapping in (
        (capabilities.IMAGE_TO_IMAGE, AUTO_IMAGE2IMAGE_PIPELINES_MAPPING),
        (capabilities.INPAINTING, AUTO_INPAINT_PIPELINES_MAPPING),
    ):
        made = _get_task_class(mapping, name, throw_error_if_not_exist=False)
        assert table.get(name) == (made and made.__name__)
    assert offered.class_conditional == generate.is_class_conditional(pipe)
    assert offered.previews
    assert offered.edits == (name != "PixArtAlphaPipeline" and name != "PixArtSigmaPipeline")
    assert offered.inpainting == (offered.edits and not offered.class_conditional)


def test_an_unknown_pipeline_is_offered_nothing_beyond_generation():
    assert capabilities.capabilities(None, None) == capabilities.Capabilities(
        class_conditional=False, edits=False, inpainting=False, previews=False
    )


def test_capabilities_import_neither_torch_nor_diffusers():
    code = (
        "import sys, pipelines.capabilities; "
        "sys.exit(bool({'torch', 'diffusers'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
