"""The FP trajectory, recorded once: everything the sensitivity analysis measures on.

One sampling run of the FP pipeline on the measuring conditions (all of them in one batch, to
the last step: its final latents are what the end-to-end check compares against). At a few
steps spread over the schedule, forward hooks keep the denoiser's inputs and outputs, every
block's inputs and outputs, and every quantizable layer's input range per channel. Each unit
is then measured from these, never by sampling again:

- at scope "block": the block holding the unit is run alone on its recorded inputs;
- at scope "denoiser": the blocks that run before it return their recorded outputs instead of
  computing them, so a call costs only the blocks from the unit's on.

Tensors are kept once per call even where a block's output is the next block's input.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from quantization.activations import ActivationStats
from quantization.capture import Call, denoiser_output, timestep_of

__all__ = [
    "Recording",
    "record_calls_replayed",
    "record_trajectory",
    "recorded_steps",
    "tensor_nbytes",
]


def recorded_steps(num_inference_steps: int, count: int | None) -> list[int]:
    """``count`` step indices spread evenly over the schedule, the first and last included
    (None or more than there are: every step)."""
    if count is None or count >= num_inference_steps:
        return list(range(num_inference_steps))
    if count < 1:
        raise ValueError("record at least one step")
    if count == 1:
        return [0]
    return sorted({round(float(i)) for i in np.linspace(0, num_inference_steps - 1, count)})


def _clone(value: Any, memo: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A detached copy of nested tensors; a tensor seen before in this call is shared."""
    if isinstance(value, torch.Tensor):
        hit = memo.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        copy = value.detach().clone()
        memo[id(value)] = (value, copy)  # the original is held: its id cannot be reused
        return copy
    if isinstance(value, tuple):
        items = [_clone(v, memo) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_clone(v, memo) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v, memo) for k, v in value.items()}
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # a diffusers BaseOutput
        return type(value)(**{k: _clone(v, memo) for k, v in value.items()})
    return value


def tensor_nbytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors inside a nested value."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.numel() * value.element_size()
    if isinstance(value, Call):
        return tensor_nbytes([value.args, value.kwargs], seen)
    if isinstance(value, (tuple, list)):
        return sum(tensor_nbytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(tensor_nbytes(v, seen) for v in value.values())
    if hasattr(value, "to_tuple"):
        return sum(tensor_nbytes(v, seen) for v in value.to_tuple())
    return 0


@dataclass
class Recording:
    """The FP trajectory of the measuring conditions at the recorded steps.

    ``block_inputs[b][i]`` / ``block_outputs[b][i]``: what block ``b`` received / returned at
    recorded call ``i`` (a list: one entry per time the block ran in that call).
    """

    steps: list[int]
    calls: list[Call]
    outputs: list[torch.Tensor]
    block_order: list[str]
    block_inputs: dict[str, list[list[Call]]]
    block_outputs: dict[str, list[list[Any]]]
    latents: torch.Tensor
    stats: ActivationStats
    seconds: float
    nbytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def timesteps(self) -> list[float | None]:
        return [timestep_of(c.args, c.kwargs) for c in self.calls]

    def before(self, block: str) -> list[str]:
        """The blocks that run before ``block`` in a call."""
        return self.block_order[: self.block_order.index(block)]


@torch.no_grad()
def record_trajectory(
    denoiser: nn.Module,
    run: Callable[[], torch.Tensor],
    *,
    keep: list[int],
    blocks: list[str],
    layers: list[str],
    progress: Callable[[int], None] = lambda step: None,
) -> Recording:
    """Run ``run()`` (FP sampling to the end, returning the final latents) and record the
    denoiser's calls at the step indices ``keep``, with every block's inputs and outputs and
    every layer's input range per channel."""
    wanted = set(keep)
    state = {"step": -1, "active": False, "memo": {}}
    calls: list[Call] = []
    outputs: list[torch.Tensor] = []
    order: list[str] = []
    block_inputs: dict[str, list[list[Call]]] = {b: [] for b in blocks}
    block_outputs: dict[str, list[list[Any]]] = {b: [] for b in blocks}
    stats = ActivationStats()

    def on_call(module, args, kwargs):
        state["step"] += 1
        step = state["step"]
        progress(step)
        state["active"] = step in wanted
        state["memo"] = {}
        if state["active"]:
            calls.append(Call(step, _clone(args, state["memo"]), _clone(kwargs, state["memo"])))
            stats.steps.append(step)
            stats.timesteps.append(timestep_of(args, kwargs))
            for b in blocks:
                block_inputs[b].append([])
                block_outputs[b].append([])

    def on_return(module, args, kwargs, out):
        if state["active"]:
            outputs.append(denoiser_output(out).detach().clone())
        state["memo"] = {}

    def block_in(name):
        def hook(module, args, kwargs):
            if state["active"]:
                memo = state["memo"]
                block_inputs[name][-1].append(
                    Call(state["step"], _clone(args, memo), _clone(kwargs, memo))
                )

        return hook

    def block_out(name):
        def hook(module, args, kwargs, out):
            if state["active"]:
                block_outputs[name][-1].append(_clone(out, state["memo"]))
                if name not in order:
                    order.append(name)

        return hook

    def layer_in(name):
        def hook(module, args):
            if state["active"]:
                stats.observe(name, args[0])

        return hook

    handles = [
        denoiser.register_forward_pre_hook(on_call, with_kwargs=True),
        denoiser.register_forward_hook(on_return, with_kwargs=True),
    ]
    for b in blocks:
        m = denoiser.get_submodule(b)
        handles.append(m.register_forward_pre_hook(block_in(b), with_kwargs=True))
        handles.append(m.register_forward_hook(block_out(b), with_kwargs=True))
    for layer in layers:
        handles.append(denoiser.get_submodule(layer).register_forward_pre_hook(layer_in(layer)))
    start = time.perf_counter()
    try:
        latents = run()
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - start
    missing = [b for b in blocks if b not in order]
    if missing:
        raise ValueError(f"blocks {missing[:3]} never ran while sampling")
    seen: set[int] = set()
    nbytes = tensor_nbytes([calls, outputs], seen)
    nbytes += sum(tensor_nbytes(v, seen) for v in [*block_inputs.values(), *block_outputs.values()])
    return Recording(
        steps=[c.step for c in calls],
        calls=calls,
        outputs=outputs,
        block_order=order,
        block_inputs=block_inputs,
        block_outputs=block_outputs,
        latents=latents,
        stats=stats,
        seconds=seconds,
        nbytes=nbytes,
    )


def record_calls_replayed(
    denoiser: nn.Module, calls: list[Call], *, blocks: list[str], layers: list[str]
) -> Recording:
    """A recording of given denoiser inputs (synthetic ones, or recorded elsewhere), each call
    a step; no sampler ran, so there are no final latents to check against."""

    def run() -> torch.Tensor:
        for c in calls:
            denoiser(*c.args, **c.kwargs)
        return torch.empty(0)

    return record_trajectory(
        denoiser, run, keep=list(range(len(calls))), blocks=blocks, layers=layers
    )
