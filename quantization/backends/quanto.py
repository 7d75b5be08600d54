"""The optimum-quanto backend: static activations with one scale per layer (per tensor).

Every call to optimum-quanto lives here. It turns a plan into quanto modules (one ``quantize``
call per disjoint set of layers), re-applies our group sizes (quanto neither takes nor saves
one), installs SmoothQuant input scales, calibrates activation ranges, freezes, and moves
state dicts in and out with strict key checks. It packs int4 weights two to a byte, on any
device; its activation scales are scalars, so it has no dynamic (per-token) mode. Static
scales per timestep range (granularity "timestep") are ours on top of it: each such layer keeps
one scale per range of the schedule, and a hook on the denoiser puts the range's scale in place
before every call, from the call's timestep.

Pitfalls handled here (docs/quantization.md, "Backend pitfalls"): overlapping ``quantize``
calls corrupt qtypes, so each layer is named exactly once; ``None`` entries of non-affine
LayerNorms are dropped before saving; ``requantize`` loads with ``strict=False``, so we never
use it and check the keys ourselves. Calibration is ours rather than quanto's ``Calibration``
context (``quantization.activations``: the same per-tensor absmax scales and moving average,
taken once on the FP inputs and divided by the smoothing scales), so no ``streamline``
decision that a reload would lose, and no forward pass to quantize a copy of a unit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from optimum.quanto import QTensor, freeze, qtypes, quantize
from optimum.quanto.nn import QModuleMixin
from optimum.quanto.tensor.core import dtype_info

from quantization.activations import (
    RANGE_EDGES,
    RANGE_SCALES,
    SMOOTH_BUFFER,
    InputRange,
    install_ranges,
    install_smoothing,
    size_ranges,
)
from quantization.backends.state import check_keys
from quantization.plan import LayerPlan
from quantization.types import TIME_RANGES, LayerSpec, effective_group_size

__all__ = [
    "LAYERS",
    "NAME",
    "build_extensions",
    "check",
    "is_quantized",
    "layer_specs",
    "load_state",
    "nbytes",
    "plain",
    "prepare",
    "quantize_layers",
    "state_dict",
    "versions",
]

LAYERS: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear, torch.nn.Conv2d)
NAME = "quanto"
QTYPES = {"int4": "qint4", "int8": "qint8", "fp8": "qfloat8_e4m3fn"}  # ours -> quanto's
NAMES = {v: k for k, v in QTYPES.items()}


def build_extensions() -> list[str]:
    """Compile quanto's native kernels now (its int4 unpacking on CPU, and on CUDA when there is
    one) rather than at their first use: quanto builds them into its own package folder the
    first time a layer needs them, about 25 s of g++ on this 2-core CPU, which would otherwise
    land on the first job of a worker (or fail where site-packages is read-only). The names
    of the extensions built."""
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    # quanto registers the ones this machine can use (CUDA, ROCm or MPS only where present)
    names = [
        n
        for n in ("quanto_cpp", "quanto_cuda", "quanto_hip", "quanto_mps")
        if is_extension_available(n)
    ]
    for name in names:
        get_extension(name).lib  # noqa: B018 - loading is what builds it
    return names


def check(spec: LayerSpec, device: str = "cpu") -> None:
    """Raise ValueError if this backend cannot quantize a layer so."""
    if spec.weights == "bf16":
        raise ValueError("bf16 layers are the x86 backend's (--backend x86)")
    if spec.granularity == "token":
        raise ValueError(
            "optimum-quanto has static per-tensor activation scales only; per-token (dynamic) "
            "activations need --backend torchao"
        )


def apply_specs(model: torch.nn.Module, specs: dict[str, LayerSpec]) -> dict[str, LayerSpec]:
    """Swap the named layers for quanto modules, in place. Returns the specs as applied.

    Layers sharing (weights, activations) go in one ``quantize`` call with their exact names;
    group sizes are then set on each module, adjusted to what its input width allows.
    """
    activation_kinds = {s.activations for s in specs.values()} - {None}
    if len(activation_kinds) > 1:
        raise ValueError(
            f"one activation qtype per model, got {sorted(map(str, activation_kinds))}"
        )
    groups: dict[tuple[str, str | None], list[str]] = defaultdict(list)
    for name, spec in specs.items():
        check(spec)
        groups[(spec.weights, spec.activations)].append(name)
    for (weights, activations), names in groups.items():
        quantize(
            model, weights=qtypes[QTYPES[weights]], activations=_qtype(activations), include=names
        )
    applied = {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        if not isinstance(module, QModuleMixin):
            raise ValueError(f"{name} is not a quantizable layer ({type(module).__name__})")
        # W8A8 means int8 operands of the matmul: the layer's input. quanto would also round
        # every output to int8 (unless its streamline pass, whose choices are not saved, drops
        # the hook); that adds noise no consumer asked for, so outputs stay in float.
        module.disable_output_quantization()
        group = None
        if spec.weights == "int4":
            in_features = module.weight.numel() // module.weight.shape[0]
            group = effective_group_size(in_features, spec.group_size)
            module.weight_group_size = group
        applied[name] = LayerSpec(spec.weights, spec.activations, group, spec.granularity)
    return applied


def _qtype(name: str | None):
    return None if name is None else qtypes[QTYPES[name]]


EXTRA_BUFFERS = (SMOOTH_BUFFER, RANGE_SCALES, RANGE_EDGES)  # ours: quanto does not save them


def quantize_layers(
    model: torch.nn.Module,
    specs: dict[str, LayerSpec],
    ranges: Mapping[str, InputRange],
    smoothing: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerSpec]:
    """Quantize ``specs`` in ``model`` in place: swap, smooth, set the calibrated input scales
    (``ranges``: absmax per layer, per tensor or per timestep range), freeze."""
    applied = apply_specs(model, specs)
    for name, scale in (smoothing or {}).items():
        if name in specs:
            install_smoothing(model.get_submodule(name), scale)
    with torch.no_grad():
        for name, spec in specs.items():
            if spec.activations is None:
                continue
            if name not in ranges:
                raise ValueError(f"{name} has static activations but no calibrated range")
            module = model.get_submodule(name)
            r = ranges[name]
            qmax = dtype_info(module.activation_qtype.dtype).max
            scales = (r.absmax.float() / qmax).to(module.input_scale.dtype)
            module.input_scale = scales.max().reshape(module.input_scale.shape).clone()
            if spec.granularity == "timestep":
                if r.edges is None:
                    raise ValueError(f"{name} is calibrated per tensor, not per timestep range")
                module.register_buffer(RANGE_SCALES, scales.clone())
                module.register_buffer(RANGE_EDGES, r.edges.clone())
    freeze(model)
    install_ranges(model)
    return applied


def prepare(model: torch.nn.Module, plan: dict[str, LayerPlan]) -> dict[str, LayerSpec]:
    """The structure a saved plan needs (quanto modules, smoothing hooks), weights not loaded."""
    applied = apply_specs(model, {n: lp.spec for n, lp in plan.items()})
    for name, lp in plan.items():
        module = model.get_submodule(name)
        if lp.smoothing_alpha is not None:
            install_smoothing(module, None)
        if lp.spec.granularity == "timestep":  # sizes come with the saved tensors
            module.register_buffer(RANGE_SCALES, torch.ones(TIME_RANGES))
            module.register_buffer(RANGE_EDGES, torch.zeros(TIME_RANGES - 1))
    install_ranges(model)
    return applied


def plain(t: torch.Tensor) -> torch.Tensor:
    """A float copy of a tensor that may be a quanto activation."""
    return t.dequantize() if isinstance(t, QTensor) else t.detach().clone()


def is_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, QModuleMixin)


def layer_specs(model: torch.nn.Module) -> dict[str, LayerSpec]:
    """The specs of the quanto layers of a model, group sizes included."""
    return {
        name: LayerSpec(
            NAMES[m.weight_qtype.name],
            None if m.activation_qtype is None else NAMES[m.activation_qtype.name],
            m.weight_group_size,
            "timestep" if hasattr(m, RANGE_SCALES) else "tensor",
        )
        for name, m in model.named_modules()
        if isinstance(m, QModuleMixin) and m.weight_qtype is not None
    }


def nbytes(module: torch.nn.Module) -> int:
    """Bytes of a module's saved tensors (packed quantized data, scales, biases, smoothing)."""
    return sum(v.numel() * v.element_size() for v in quantized_state_dict(module).values())


def state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The flat tensors to save, and the safetensors metadata they need (none for quanto)."""
    return quantized_state_dict(model), {}


def quantized_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The flat tensors of a frozen model (QTensors split into their parts), ``None`` dropped.

    quanto's modules save only their weight, bias and scales, so ours (the SmoothQuant scales,
    the scales per timestep range and their edges) are added here under ``<layer>.<buffer>``.
    """
    state = {k: v.contiguous() for k, v in model.state_dict().items() if v is not None}
    for name, module in model.named_modules():
        for buffer in EXTRA_BUFFERS:
            if hasattr(module, buffer):
                key = f"{name}.{buffer}" if name else buffer
                state[key] = getattr(module, buffer).detach().contiguous()
    return state


def load_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Load a saved state dict into a model ``prepare``d with the same plan.

    The keys must be exactly those the prepared model saves once frozen: quanto's own
    ``requantize`` loads with ``strict=False`` and would keep random weights without a word.
    """
    freeze(model)
    check_keys(quantized_state_dict(model), state)
    size_ranges(model, state)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():  # quanto's modules do not load our buffers themselves
        for key, value in state.items():
            owner, _, buffer = key.rpartition(".")
            if buffer in EXTRA_BUFFERS:
                getattr(model.get_submodule(owner), buffer).copy_(value)
    install_ranges(model)


def versions() -> dict[str, str]:
    import optimum.quanto

    return {"optimum-quanto": optimum.quanto.__version__}
