"""Activation ranges, static scales and the SmoothQuant hook: one place for both backends.

The FP denoiser is replayed once on the calibration calls with a forward pre-hook on every
quantizable layer; each call leaves, per layer, the absmax of each input channel
(``ActivationStats``). Every static scale the method needs is then arithmetic on those:

- per tensor: the moving average (momentum 0.9, as optimum-quanto's) over the calls of the
  input's absmax. With SmoothQuant the layer's input is ``x / s``, whose absmax is
  ``max_j(absmax_j / s_j)``: smoothing with any alpha needs no new pass. The same for the
  input's minimum and maximum (``min_j(min_j / s_j)``, ``max_j(max_j / s_j)``), for backends
  whose static scales are asymmetric (x86: a SiLU or GELU output spends no code on the
  negative half it does not have);
- per timestep range: the same over the calls whose timestep falls in each range;
- smoothing itself: the channel absmax over all calls.

A quantized copy of a unit is therefore made without running anything (the sensitivity
analysis makes hundreds). Scales are taken on FP inputs, upstream layers unquantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from quantization.capture import Call, timestep_of
from quantization.types import TIME_RANGES, LayerSpec

__all__ = [
    "MOMENTUM",
    "RANGE_EDGES",
    "RANGE_SCALES",
    "SMOOTH_BUFFER",
    "ActivationStats",
    "InputRange",
    "attach_smoothing",
    "collect_stats",
    "install_ranges",
    "install_smoothing",
    "ranges_for",
    "size_ranges",
    "time_ranges",
]

MOMENTUM = 0.9
SMOOTH_BUFFER = "smooth_scale"


def channel_dim(x: torch.Tensor) -> int:
    """The channel dimension of a layer input: 1 for a conv's NCHW, the last for a linear's."""
    return 1 if x.dim() == 4 else x.dim() - 1


def channel_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max of x per input channel, float32."""
    d = channel_dim(x)
    low, high = torch.aminmax(x.detach().transpose(d, -1).reshape(-1, x.shape[d]), dim=0)
    return low.float(), high.float()


@dataclass(frozen=True)
class InputRange:
    """A layer's calibrated input absmax: one value (per tensor) or one per timestep range,
    with the timesteps between the ranges (ascending). Backends divide by their qtype's max.
    ``low`` / ``high``: the input's calibrated minimum and maximum, per range, where the
    statistics kept them (asymmetric scales)."""

    absmax: torch.Tensor  # (ranges,)
    edges: torch.Tensor | None = None  # (ranges - 1,) or None for a single range
    ndim: int = 2  # dimensions of the layer's input (torchao shapes its static scale so)
    low: torch.Tensor | None = None  # (ranges,), <= 0
    high: torch.Tensor | None = None  # (ranges,), >= 0


@dataclass
class ActivationStats:
    """Per layer, per recorded call: the input's absmax, minimum and maximum per channel
    (``lows`` / ``highs``: empty in statistics saved before they were kept); the calls' steps
    and timesteps; each layer's input rank."""

    steps: list[int] = field(default_factory=list)
    timesteps: list[float | None] = field(default_factory=list)
    channels: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    ndim: dict[str, int] = field(default_factory=dict)
    lows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    highs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def observe(self, layer: str, x: torch.Tensor) -> None:
        """Add a layer input seen during the current call (the last of ``steps``); a layer
        that runs twice in one call (DiT's first adaLN embedding) keeps the larger range."""
        low, high = channel_extremes(x)
        for store, value, keep in (
            (self.channels, torch.maximum(high, -low), torch.maximum),
            (self.lows, low, torch.minimum),
            (self.highs, high, torch.maximum),
        ):
            values = store.setdefault(layer, [])
            if len(values) == len(self.steps):
                values[-1] = keep(values[-1], value)
            else:
                values.append(value)
        self.ndim[layer] = x.dim()

    def channel_absmax(self, layer: str) -> torch.Tensor:
        """Over every call: what SmoothQuant's scales are computed from."""
        return torch.stack(self.channels[layer]).amax(0)

    def absmax_by_step(self, layer: str) -> dict[int, float]:
        """Per sampling step, the largest input absmax seen (for time drift)."""
        out: dict[int, float] = {}
        for step, c in zip(self.steps, self.channels[layer], strict=True):
            out[step] = max(out.get(step, 0.0), float(c.max()))
        return out

    def _moving(
        self,
        store: dict[str, list[torch.Tensor]],
        layer: str,
        calls: list[int],
        smoothing: torch.Tensor | None,
        lowest: bool = False,
    ) -> torch.Tensor:
        """The moving average over ``calls`` of the largest (``lowest``: smallest) channel
        value of the (smoothed) input."""
        value: torch.Tensor | None = None
        for i in calls:
            c = store[layer][i]
            c = c if smoothing is None else c / smoothing.float()
            new = c.min() if lowest else c.max()
            value = new if value is None else MOMENTUM * value + (1.0 - MOMENTUM) * new
        if value is None:
            raise ValueError(f"no calibration call reached {layer}")
        return value

    def input_range(
        self, layer: str, smoothing: torch.Tensor | None = None, ranges: int = 1
    ) -> InputRange:
        """The layer's static input range: per tensor, or per ``ranges`` timestep ranges."""
        groups: list[list[int]] = [list(range(len(self.steps)))]
        edges = None
        if ranges > 1:
            groups, edges = time_ranges(self.timesteps, ranges)

        def per_range(store, lowest=False) -> torch.Tensor:
            return torch.stack([self._moving(store, layer, g, smoothing, lowest) for g in groups])

        absmax = per_range(self.channels).clamp(min=1e-8)
        if layer not in self.lows:  # statistics saved before minima were kept
            return InputRange(absmax, edges, self.ndim[layer])
        low = per_range(self.lows, lowest=True).clamp(max=0.0)
        high = per_range(self.highs).clamp(min=0.0)
        return InputRange(absmax, edges, self.ndim[layer], low, high)


def time_ranges(timesteps: list[float | None], ranges: int) -> tuple[list[list[int]], torch.Tensor]:
    """Call indices split into up to ``ranges`` contiguous ranges of their timesteps (about
    as many distinct timesteps each; calls keep their order), and the edges between ranges
    (midpoints, ascending)."""
    if not timesteps:
        raise ValueError("scales per timestep range need calibration calls")
    if any(t is None for t in timesteps):
        raise ValueError("scales per timestep range need the denoiser's timestep argument")
    ts = sorted({float(t) for t in timesteps if t is not None})
    n = min(ranges, len(ts))
    bounds = [round(i * len(ts) / n) for i in range(n + 1)]
    chunks = [ts[bounds[i] : bounds[i + 1]] for i in range(n)]
    edges = [(chunks[i][-1] + chunks[i + 1][0]) / 2 for i in range(n - 1)]
    index = {t: i for i, chunk in enumerate(chunks) for t in chunk}
    groups: list[list[int]] = [[] for _ in chunks]
    for i, t in enumerate(timesteps):
        groups[index[float(t)]].append(i)  # type: ignore[arg-type]
    return groups, torch.tensor(edges, dtype=torch.float32)


@torch.no_grad()
def collect_stats(
    denoiser: nn.Module, layers: list[str], calls: list[Call], stats: ActivationStats | None = None
) -> ActivationStats:
    """Replay ``calls`` on the FP denoiser, keeping every named layer's channel absmax."""
    stats = stats or ActivationStats()
    handles = []

    def hook(name: str):
        def on_input(module, args) -> None:
            stats.observe(name, args[0])

        return on_input

    for name in layers:
        handles.append(denoiser.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        for call in calls:
            stats.steps.append(call.step)
            stats.timesteps.append(timestep_of(call.args, call.kwargs))
            denoiser(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


def _smooth_input(module: nn.Module, args):
    x = args[0]
    s = getattr(module, SMOOTH_BUFFER)
    shape = [1] * x.dim()
    shape[channel_dim(x)] = -1
    return (x / s.view(shape).to(x.dtype), *args[1:])


def install_smoothing(module: nn.Module, scale: torch.Tensor | None) -> None:
    """SmoothQuant on a layer whose weight is still float: weight columns * s, input / s.

    The product is unchanged in float; the activation loses its outlier channels, the weight
    takes them. ``scale=None`` installs the hook and a placeholder buffer only, for a layer
    whose smoothed weight and scale come from a saved state dict. The hook goes first, before
    any input quantization a backend hooks in.
    """
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"smoothing applies to a layer with a weight, not {type(module).__name__}")
    in_dim = int(weight.shape[1])
    if scale is not None:
        if scale.shape != (in_dim,):
            raise ValueError(
                f"smoothing scale of shape {tuple(scale.shape)}, layer has {in_dim} inputs"
            )
        shape = [1, in_dim] + [1] * (weight.dim() - 2)
        with torch.no_grad():
            weight.mul_(scale.view(shape).to(weight.dtype))
    buffer = torch.ones(in_dim) if scale is None else scale.detach().clone()
    attach_smoothing(module, buffer.to(weight.dtype))


def attach_smoothing(module: nn.Module, scale: torch.Tensor) -> None:
    """The input side of SmoothQuant alone: a saved buffer and a forward pre-hook dividing
    the input by it, first among the hooks (a layer rebuilt from a smoothed one keeps it)."""
    module.register_buffer(SMOOTH_BUFFER, scale)
    module.register_forward_pre_hook(_smooth_input, prepend=True)


def ranges_for(
    stats: ActivationStats | None,
    specs: Mapping[str, LayerSpec],
    smoothing: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, InputRange]:
    """The calibrated input ranges the static layers of ``specs`` need (smoothed inputs where
    ``smoothing`` has a layer's scales; one per timestep range for granularity "timestep")."""
    out = {}
    for name, spec in specs.items():
        if spec.activations is None or spec.granularity == "token":
            continue
        if stats is None or name not in stats.channels:
            raise ValueError(f"{name} has static activations and no calibration ranges")
        count = TIME_RANGES if spec.granularity == "timestep" else 1
        out[name] = stats.input_range(name, (smoothing or {}).get(name), count)
    return out


# granularity "timestep": a layer's scale for each range of timesteps, and the timesteps
# between ranges (ascending); the range of a call is the number of edges below its t. Both
# static backends keep their current scale in ``input_scale`` and the ranges beside it.
RANGE_SCALES, RANGE_EDGES = "range_scales", "range_edges"


def _ranged(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, RANGE_SCALES)]


def _select_range(model: nn.Module, args, kwargs) -> None:
    """Denoiser pre-hook: each ranged layer's input scale := its scale for this call's t."""
    t = timestep_of(args, kwargs)
    for m in getattr(model, "_t2i_ranged", []):
        edges = getattr(m, RANGE_EDGES)
        i = int((edges < t).sum()) if t is not None else 0
        m.input_scale.copy_(getattr(m, RANGE_SCALES)[i].to(m.input_scale.dtype))


def install_ranges(model: nn.Module) -> None:
    """The hook that switches scales by timestep, on a model that has ranged layers (and none
    on one that no longer has: the sensitivity analysis swaps quantized copies in and out)."""
    ranged = _ranged(model)
    hook = getattr(model, "_t2i_range_hook", None)
    if ranged and hook is None:
        handle = model.register_forward_pre_hook(_select_range, with_kwargs=True)
        object.__setattr__(model, "_t2i_range_hook", handle)
    elif not ranged and hook is not None:
        hook.remove()
        object.__delattr__(model, "_t2i_range_hook")
    object.__setattr__(model, "_t2i_ranged", ranged)


def size_ranges(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Before loading a saved state: each ranged layer's buffers get as many timestep ranges
    as were calibrated (a prepared model holds placeholders of the default count)."""
    for key, value in state.items():
        owner, _, buffer = key.rpartition(".")
        if buffer in (RANGE_SCALES, RANGE_EDGES):
            model.get_submodule(owner).register_buffer(buffer, torch.empty_like(value))
