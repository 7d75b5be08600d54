"""Forward hooks: record the denoiser's inputs at chosen sampling steps, and replay them.
Torch only, no quantization backend here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Call",
    "denoiser_output",
    "detach",
    "record_calls",
    "replay",
    "timestep_of",
]


class _StopSampling(Exception):
    """Raised from the hook once every wanted step is recorded: the rest of the run is skipped."""


@dataclass(frozen=True)
class Call:
    """The positional and keyword inputs of one denoiser call, i.e. one sampling step."""

    step: int
    args: tuple
    kwargs: dict


def timestep_of(args: tuple, kwargs: dict) -> float | None:
    """The timestep a diffusers denoiser is called at (``timestep=`` or its 2nd argument);
    one value per call: the first where the batch carries one per sample."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0])
    # a block's call may hold anything there (PixArt's adaln_single: its added_cond_kwargs)
    return float(t) if isinstance(t, int | float) else None


def detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(detach(v) for v in value)
    if isinstance(value, dict):
        return {k: detach(v) for k, v in value.items()}
    return value


def record_calls(denoiser: nn.Module, run, steps: set[int] | None = None) -> list[Call]:
    """Run ``run()`` (a pipeline call) and keep the denoiser inputs of the wanted steps.

    Args:
        steps: step indices to keep (0 = first step, t = T); None keeps every step. When a set
            is given, sampling stops right after its last step, so single-step calibration
            costs one denoiser call instead of a whole trajectory.
    """
    calls: list[Call] = []
    counter = [0]
    last = None if steps is None else max(steps)

    def hook(module, args, kwargs):
        step = counter[0]
        counter[0] += 1
        if steps is None or step in steps:
            calls.append(Call(step, detach(args), detach(kwargs)))
        if last is not None and step >= last:
            raise _StopSampling

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _StopSampling:
        pass
    finally:
        handle.remove()
    return calls


def denoiser_output(out) -> torch.Tensor:
    """The predicted noise (or velocity) from a diffusers model's output, dict or tuple."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else out.sample


@torch.no_grad()
def replay(denoiser: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    """Feed recorded inputs to a (possibly quantized) denoiser; one output per call."""
    return [denoiser_output(denoiser(*c.args, **c.kwargs)) for c in calls]
