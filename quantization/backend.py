"""Every call to optimum-quanto lives here, so another backend (torchao) can be added beside it.

The rest of the package speaks in plans: ``{layer_name: LayerSpec}``. This module turns a plan
into quanto modules (one ``quantize`` call per disjoint set of layers), re-applies our group
sizes (quanto neither takes nor saves one), calibrates activation ranges, freezes, and moves
state dicts in and out with strict key checks.

Pitfalls handled here (see QUANTO_NOTES.md): overlapping ``quantize`` calls corrupt qtypes, so
each layer is named exactly once; ``Calibration(streamline=True)`` is not reproducible after a
reload, so it is off; ``None`` entries of non-affine LayerNorms are dropped before saving;
``requantize`` loads with ``strict=False``, so we never use it and check the keys ourselves.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from optimum.quanto import Calibration, freeze, qtypes, quantize
from optimum.quanto.nn import QModuleMixin

__all__ = [
    "ACTIVATION_QTYPES",
    "WEIGHT_QTYPES",
    "LayerSpec",
    "apply_specs",
    "calibration",
    "freeze_model",
    "is_quantized",
    "layer_specs",
    "load_quantized_state",
    "quantized_state_dict",
    "state_dict_bytes",
]

WEIGHT_QTYPES = ("qint4", "qint8", "qfloat8")  # qfloat8 = float8 e4m3
ACTIVATION_QTYPES = ("qint8", "qfloat8")
GROUPED = ("qint4",)
MOMENTUM = 0.9


@dataclass(frozen=True)
class LayerSpec:
    """How one Linear / Conv2d layer is quantized. ``group_size=None``: one scale per row."""

    weights: str
    activations: str | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_QTYPES:
            raise ValueError(f"weights qtype must be one of {WEIGHT_QTYPES}, not {self.weights!r}")
        if self.activations is not None and self.activations not in ACTIVATION_QTYPES:
            raise ValueError(
                f"activations qtype must be one of {ACTIVATION_QTYPES} or None, "
                f"not {self.activations!r}"
            )
        if self.group_size is not None and self.weights not in GROUPED:
            raise ValueError(f"group_size applies to {GROUPED} weights only, not {self.weights}")


def effective_group_size(in_features: int, wanted: int | None) -> int | None:
    """The group size a layer really gets: ``wanted`` if it splits the rows, else per row."""
    if wanted is None or in_features <= wanted or in_features % wanted:
        return None
    return wanted


def apply_specs(model: torch.nn.Module, specs: dict[str, LayerSpec]) -> dict[str, LayerSpec]:
    """Swap the named layers for quanto modules, in place. Returns the specs as applied.

    Layers sharing (weights, activations) go in one ``quantize`` call with their exact names;
    group sizes are then set on each module, adjusted to what its input width allows.
    """
    activation_kinds = {s.activations for s in specs.values()} - {None}
    if len(activation_kinds) > 1:
        raise ValueError(f"one activation qtype per model, got {sorted(activation_kinds)}")
    groups: dict[tuple[str, str | None], list[str]] = defaultdict(list)
    for name, spec in specs.items():
        groups[(spec.weights, spec.activations)].append(name)
    for (weights, activations), names in groups.items():
        quantize(model, weights=qtypes[weights], activations=_qtype(activations), include=names)
    applied = {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        if not isinstance(module, QModuleMixin):
            raise ValueError(f"{name} is not a quantizable layer ({type(module).__name__})")
        group = None
        if spec.weights in GROUPED:
            in_features = module.weight.numel() // module.weight.shape[0]
            group = effective_group_size(in_features, spec.group_size)
            module.weight_group_size = group
        applied[name] = LayerSpec(spec.weights, spec.activations, group)
    return applied


def _qtype(name: str | None):
    return None if name is None else qtypes[name]


@contextmanager
def calibration():
    """Inside, forward passes record per-tensor absmax activation ranges (moving average)."""
    with torch.no_grad(), Calibration(momentum=MOMENTUM, streamline=False):
        yield


def freeze_model(model: torch.nn.Module) -> None:
    """Replace float weights by their quantized tensors (after calibration)."""
    freeze(model)


def is_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, QModuleMixin)


def layer_specs(model: torch.nn.Module) -> dict[str, LayerSpec]:
    """The specs of the quanto layers of a model, group sizes included."""
    return {
        name: LayerSpec(
            m.weight_qtype.name,
            None if m.activation_qtype is None else m.activation_qtype.name,
            m.weight_group_size,
        )
        for name, m in model.named_modules()
        if isinstance(m, QModuleMixin) and m.weight_qtype is not None
    }


def quantized_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The flat tensors of a frozen model (QTensors split into their parts), ``None`` dropped."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if v is not None}


def state_dict_bytes(state: dict[str, torch.Tensor], prefix: str = "") -> int:
    """Bytes of the tensors whose key starts with ``prefix`` - the size on disk and in memory."""
    return sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(prefix))


def load_quantized_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a saved state dict into a model prepared by ``apply_specs`` with the same plan.

    The keys must be exactly those the prepared model saves once frozen: quanto's own
    ``requantize`` loads with ``strict=False`` and would keep random weights without a word.
    """
    freeze(model)
    expected = set(quantized_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"state dict does not match the plan: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)
