"""The torchao backend: per-token dynamic or static int8 activations, int8 / int4 / fp8 weights.

Every call to torchao lives here. A plan becomes one ``quantize_`` call with an ``FqnToConfig``
naming each layer exactly once:

- w8a8, per token: ``Int8DynamicActivationInt8WeightConfig`` with asymmetric activations (one
  scale and zero point per token, found at run time; asymmetric because the inputs after GELU
  and SiLU are one-sided, and measured better: docs/quantization-results.md);
- w8a8, per tensor: ``Int8StaticActivationInt8WeightConfig`` with *our* calibrated scale
  (``quantization.activations``: absmax over the calibration calls, moving average);
- w8a16: ``Int8WeightOnlyConfig``; w4a16 / w4a8 per token: ``IntxWeightOnlyConfig`` /
  ``Int8DynamicActivationIntxWeightConfig`` with int4 in groups. On a CPU torchao keeps int4
  values one per byte (its packed CPU kernels are not built for this machine), so int4 buys
  no memory here: the sizes reported are those the tensors really take;
- fp8 (e4m3), per token or weight-only: CUDA devices of compute capability 8.9 or above only.

torchao swaps the weight tensor of the layer in place (the module stays an ``nn.Linear``), so
SmoothQuant is applied before quantizing (``quantization.activations.install_smoothing``:
weight columns * s, a forward pre-hook dividing the input by s, a saved buffer). torchao
quantizes Linear layers only; Conv2d layers of a plan are refused with an error that names
the quanto backend.

Saving flattens the tensor subclasses into plain tensors and JSON metadata (torchao's
safetensors support), never pickle; loading rebuilds the same configs on a fresh model and
assigns the tensors, with strict key checks.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from quantization.activations import InputRange, install_smoothing
from quantization.backends.state import check_keys
from quantization.plan import LayerPlan
from quantization.types import LayerSpec, effective_group_size

__all__ = [
    "LAYERS",
    "NAME",
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

LAYERS: tuple[type[nn.Module], ...] = (nn.Linear,)  # the layer types it quantizes
NAME = "torchao"
SPEC_ATTR = "_t2i_spec"  # the LayerSpec a layer was quantized by (torchao keeps no record)


def _ao():
    """torchao, imported on first use, without its warnings about CUDA-only extensions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)
        import torchao.quantization as q
        from torchao.quantization import granularity
    return q, granularity


def _fp8_capable(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def check(spec: LayerSpec, device: str = "cpu") -> None:
    """Raise ValueError if this backend cannot quantize a layer so on ``device``."""
    if spec.weights == "bf16":
        raise ValueError("bf16 layers are the x86 backend's (--backend x86)")
    if spec.granularity == "timestep":
        raise ValueError(
            "static scales per timestep range are the quanto backend's (--backend quanto): "
            "torchao bakes one static scale into each layer's weight tensor"
        )
    if spec.weights == "fp8" or spec.activations == "fp8":
        if not _fp8_capable(device):
            raise ValueError(
                "torchao's fp8 needs a CUDA device of compute capability 8.9 or above "
                f"(this is {device}); use --backend quanto for fp8 elsewhere"
            )
        if spec.activations == "fp8" and spec.granularity != "token":
            raise ValueError("torchao's fp8 activations here are per token (dynamic) only")
    if spec.weights == "int4" and spec.activations == "int8" and spec.granularity == "tensor":
        raise ValueError(
            "torchao has no int4-weight config with static int8 activations; use "
            "--backend quanto, or per-token activations (--granularity token)"
        )
    if (spec.activations == "fp8") != (spec.weights == "fp8") and spec.activations is not None:
        raise ValueError("torchao pairs fp8 activations with fp8 weights only")


def _config(spec: LayerSpec, act_scale: torch.Tensor | None, input_ndim: int | None):
    q, g = _ao()
    if spec.weights == "int8" and spec.activations is None:
        return q.Int8WeightOnlyConfig()
    if spec.weights == "int8" and spec.granularity == "token":
        return q.Int8DynamicActivationInt8WeightConfig(act_mapping_type=q.MappingType.ASYMMETRIC)
    if spec.weights == "int8":
        if act_scale is None or input_ndim is None:
            raise ValueError("static activations need a calibrated scale")
        return q.Int8StaticActivationInt8WeightConfig(
            act_quant_scale=act_scale.reshape([1] * input_ndim).float(),
            granularity=[g.PerTensor(), g.PerRow()],
        )
    if spec.weights == "int4":
        groups = g.PerGroup(spec.group_size) if spec.group_size else g.PerAxis(0)
        int4 = torch.int4  # type: ignore[attr-defined]  # torch's sub-byte dtypes are untyped
        if spec.activations is None:
            return q.IntxWeightOnlyConfig(weight_dtype=int4, granularity=groups)
        return q.Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=groups)
    if spec.activations is None:
        return q.Float8WeightOnlyConfig()
    return q.Float8DynamicActivationFloat8WeightConfig(granularity=g.PerRow())


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{name} is a {type(module).__name__}: torchao quantizes Linear layers only "
            "(use --backend quanto for a plan with convolutions)"
        )
    return module


def _applied(module: nn.Linear, spec: LayerSpec) -> LayerSpec:
    group = effective_group_size(module.in_features, spec.group_size)
    return LayerSpec(
        spec.weights, spec.activations, group if spec.weights == "int4" else None, spec.granularity
    )


def _quantize(
    model: nn.Module,
    specs: dict[str, LayerSpec],
    scales: dict[str, torch.Tensor],
    ndims: dict[str, int],
) -> dict[str, LayerSpec]:
    q, _ = _ao()
    applied = {}
    configs = {}
    for name, spec in specs.items():
        check(spec, str(next(model.parameters()).device))
        module = _linear(model, name)
        applied[name] = _applied(module, spec)
        configs[name] = _config(applied[name], scales.get(name), ndims.get(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize_(model, q.FqnToConfig(configs), filter_fn=None)
    for name, spec in applied.items():
        setattr(model.get_submodule(name), SPEC_ATTR, spec)
    return applied


def _static_layers(specs: dict[str, LayerSpec]) -> list[str]:
    return [n for n, s in specs.items() if s.activations is not None and s.granularity == "tensor"]


def quantize_layers(
    model: nn.Module,
    specs: dict[str, LayerSpec],
    ranges: Mapping[str, InputRange],
    smoothing: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerSpec]:
    """Quantize ``specs`` in ``model`` in place: smooth, give static layers their calibrated
    scale (``ranges``: input absmax per layer), quantize."""
    for name, scale in (smoothing or {}).items():
        if name in specs:
            install_smoothing(_linear(model, name), scale)
    scales, ndims = {}, {}
    for name in _static_layers(specs):
        if name not in ranges:
            raise ValueError(f"{name} has static activations but no calibrated range")
        r = ranges[name]
        scales[name] = r.absmax.max().float().clamp(min=1e-8) / 127.0
        ndims[name] = r.ndim
    return _quantize(model, specs, scales, ndims)


def prepare(model: nn.Module, plan: dict[str, LayerPlan]) -> dict[str, LayerSpec]:
    """The structure a saved plan needs, weights not loaded: smoothing hooks, then the same
    configs (static layers get placeholder scales, replaced by the saved ones)."""
    for name, lp in plan.items():
        if lp.smoothing_alpha is not None:
            install_smoothing(_linear(model, name), None)
    specs = {n: lp.spec for n, lp in plan.items()}
    static = _static_layers(specs)
    # a Linear's input has the dims its saved scale has: the placeholder is reshaped on load
    scales = {n: torch.ones(()) for n in static}
    ndims = {n: 1 for n in static}
    return _quantize(model, specs, scales, ndims)


def is_quantized(module: nn.Module) -> bool:
    return hasattr(module, SPEC_ATTR)


def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    return {n: getattr(m, SPEC_ATTR) for n, m in model.named_modules() if hasattr(m, SPEC_ATTR)}


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _inner_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_inner_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def nbytes(module: nn.Module) -> int:
    """Bytes of a module's saved tensors as they lie in memory (quantized data, scales, zero
    points, biases, smoothing scales)."""
    return sum(_inner_bytes(v) for v in module.state_dict().values() if v is not None)


def state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors and the JSON metadata that rebuilds torchao's tensor subclasses."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = {k: v for k, v in model.state_dict().items() if v is not None}
    tensors, metadata = flatten_tensor_state_dict(state)
    return {k: v.contiguous() for k, v in tensors.items()}, metadata


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """Assign a saved state into a model ``prepare``d by the same plan; every key must match."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise KeyError(f"{len(leftover)} tensors belong to no state entry: {sorted(leftover)[:5]}")
    check_keys((k for k, v in model.state_dict().items() if v is not None), state)
    model.load_state_dict(state, strict=True, assign=True)


def versions() -> dict[str, str]:
    import torchao

    return {"torchao": torchao.__version__}
