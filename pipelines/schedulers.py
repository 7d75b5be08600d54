"""The samplers a request may name, and swapping a pipeline's scheduler for one of them.

Names are the ones A1111 and ComfyUI users know. The list of a model depends on its pipeline:
diffusers' DiTPipeline neither scales its initial noise by ``init_noise_sigma`` nor hands the
unscaled sample to ``step``, so the Euler samplers (sigma-space, ``init_noise_sigma`` ≫ 1)
would be wrong there and class-conditional models get the DDPM-space ones only.

Torch-free at import (the API reads the names); diffusers is imported when a scheduler is made.
"""

from __future__ import annotations

__all__ = ["CLASSES", "name_of", "names_for", "steps_run", "use"]

# name -> (diffusers class, config overrides)
CLASSES: dict[str, tuple[str, dict]] = {
    "dpm++-2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "ddim": (
        "DDIMScheduler",
        {"clip_sample": False, "set_alpha_to_one": False},  # latents are not in [-1, 1]
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
}
_DDPM_SPACE = ("dpm++-2m", "ddim")
# other samplers of the same discrete-time noise schedule (betas), whose configs these load
_SAME_SCHEDULE = {
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
}


def names_for(class_conditional: bool, native: str | None) -> list[str]:
    """The names a model accepts, its folder's own sampler first when it is one of them;
    none for a sampler of another kind (flow matching: its config has no betas)."""
    own = name_of(native)
    if own is None and native not in _SAME_SCHEDULE:
        return []
    names = list(_DDPM_SPACE) if class_conditional else list(CLASSES)
    return [own, *(n for n in names if n != own)] if own in names else names


def steps_run(steps: int, strength: float | None) -> int:
    """The denoising steps that run of ``steps`` scheduled: all, or for an edit of
    ``strength`` (SDEdit, ``pipelines.edit``) the last ``int(steps * strength)``."""
    return steps if strength is None else min(steps, int(steps * strength))


def name_of(class_name: str | None) -> str | None:
    """Our name of a diffusers scheduler class, or None."""
    return next((n for n, (c, _) in CLASSES.items() if c == class_name), None)


def use(pipe, name: str | None) -> None:
    """Give ``pipe`` the scheduler ``name``, built from the config of the folder's own (betas,
    prediction type, timestep spacing); None gives it back the folder's own."""
    native = pipe.__dict__.setdefault("_native_scheduler", pipe.scheduler)
    if name is None or name_of(type(native).__name__) == name:
        pipe.scheduler = native
        return
    import diffusers

    class_name, overrides = CLASSES[name]
    if type(pipe.scheduler).__name__ != class_name:
        pipe.scheduler = getattr(diffusers, class_name).from_config(native.config, **overrides)
