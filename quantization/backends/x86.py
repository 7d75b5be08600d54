"""The x86 backend: int8 Linear and Conv2d layers on oneDNN's kernels, in eager mode, on CPUs.

Each quantized layer becomes an ``Int8Linear`` / ``Int8Conv2d`` that holds plain tensors: the
int8 weight (symmetric, one scale per output channel), its scales, the float bias and, for
static activations, *our* calibrated input scale. At run time the input is quantized to uint8
around a zero point of 128 (one scale per tensor, aten's ``quantize_per_tensor``)
and multiplied by oneDNN's ``qlinear_pointwise`` / ``qconv_pointwise`` against a weight packed
once, on first use, by ``qlinear_prepack`` / ``qconv_prepack``: u8 × s8 with int32
accumulation, the VNNI instructions of AVX-512 CPUs (AMX where the CPU has it).

Why eager calls and not PyTorch 2 Export with the x86 Inductor quantizer: on torch 2.13 the
Inductor lowering of quantized convolutions fails to compile (``UnsupportedOperatorException:
onednn.qconv_prepack.default``, in torch's own PT2E flow too), and a frozen compiled graph
wrote into its own input (a residual add lowered to an in-place ``sum`` post-op on a graph
input: ../shared/TORCHAO_NOTES.md). Calling the kernels ourselves needs no compiler, keeps
the artifact a plain state dict, and leaves every input tensor as it was.

Levels: w8a8 with static activations, one scale per tensor or one per timestep range (the
denoiser's pre-hook in ``quantization.activations`` puts the range's scale in place before
each call), or dynamic (granularity "token": per token on Linear layers, each row quantized
by its own scale and the row's scale applied to the kernel's output; per tensor on Conv2d,
whose NCHW input has no tokens); and w8a16 (int8 weights, dequantized per call
into a float matmul). int4 weights are the quanto backend's. SmoothQuant
divides the input by ``s`` in a pre-hook (``quantization.activations``) and the weight's
columns were multiplied by ``s`` before quantizing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quantization.activations import (
    RANGE_EDGES,
    RANGE_SCALES,
    SMOOTH_BUFFER,
    InputRange,
    attach_smoothing,
    install_ranges,
    install_smoothing,
    size_ranges,
)
from quantization.backends.state import check_keys
from quantization.plan import LayerPlan
from quantization.types import TIME_RANGES, LayerSpec

__all__ = [
    "LAYERS",
    "NAME",
    "Int8Conv2d",
    "Int8Linear",
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

LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
NAME = "x86"
# aten's quantize_per_tensor is deprecated in favour of the decomposed op, which is ~9x slower
# here (five elementwise passes); torch is pinned to 2.13, where it is present
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")
ZERO_POINT = 128  # uint8 inputs centred on zero: [-128, 127] * scale
QMAX = 127.0


def check(spec: LayerSpec, device: str = "cpu") -> None:
    """Raise ValueError if this backend cannot quantize a layer so on ``device``."""
    if not device.startswith("cpu"):
        raise ValueError(f"the x86 backend runs oneDNN's CPU kernels, not on {device}")
    if spec.weights != "int8":
        raise ValueError(
            f"the x86 backend has int8 weights only, not {spec.weights}: use --backend quanto "
            "for int4 (torchao's x86 wheel ships no int4 CPU kernels)"
        )


class _Int8Layer(nn.Module):
    """Shared by both layer types: buffers, the packed weight cache, the spec."""

    spec: LayerSpec
    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor

    def _init_buffers(self, out_ch: int, weight_shape: tuple[int, ...], spec: LayerSpec, bias):
        self.spec = spec
        self.register_buffer("weight_int8", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_ch))
        self.register_buffer("bias", None if bias is None else torch.zeros(out_ch))
        if spec.activations is not None and spec.granularity != "token":
            self.register_buffer("input_scale", torch.ones(()))
        self._packed: torch.Tensor | None = None
        self._zero_points = torch.zeros(out_ch, dtype=torch.int64)

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-12) / QMAX
        shape = [-1] + [1] * (w.dim() - 1)
        self.weight_int8.copy_(torch.round(w / scale.view(shape)).clamp(-128, 127))
        self.weight_scale.copy_(scale)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.detach().float())
        self._packed = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new weights: pack again on first use
        super()._load_from_state_dict(*args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        shape = [-1] + [1] * (self.weight_int8.dim() - 1)
        return self.weight_int8.float() * self.weight_scale.view(shape)

    @staticmethod
    def _quantized(x: torch.Tensor, scale: float) -> torch.Tensor:
        """uint8 around ``ZERO_POINT``; aten's fused kernel: one pass, ~9x faster here than
        the decomposed op's five."""
        return torch.quantize_per_tensor(x, scale, ZERO_POINT, torch.quint8).int_repr()


class Int8Linear(_Int8Layer):
    """A Linear as oneDNN int8: u8 inputs (static scale) × s8 weights per output channel."""

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(out_features, (out_features, in_features), spec, True if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.activations is None:
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        onednn = torch.ops.onednn
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).float()
        if self._packed is None:
            self._packed = onednn.qlinear_prepack(self.weight_int8, None)
        if self.spec.granularity == "token":
            return self._per_token(flat).reshape(*lead, self.out_features).to(x.dtype)
        scale = float(self.input_scale)
        xq = self._quantized(flat, scale)
        out = onednn.qlinear_pointwise(
            xq, scale, ZERO_POINT, self._packed, self.weight_scale, self._zero_points, self.bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return out.reshape(*lead, self.out_features).to(x.dtype)

    def _per_token(self, flat: torch.Tensor) -> torch.Tensor:
        """Dynamic int8 per token on the same kernel: each row quantized by its own scale
        (absmax / 127, around 128), multiplied at a unit input scale, the row's scale and
        the bias applied to the int32-accumulated product afterwards."""
        scales = flat.abs().amax(dim=1).clamp(min=1e-8) / QMAX
        # four in-place passes: ~7x faster here than aten's quantize_per_channel
        xq = (flat / scales[:, None]).round_().add_(ZERO_POINT).clamp_(0, 255).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(
            xq, 1.0, ZERO_POINT, self._packed, self.weight_scale, self._zero_points,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        scaled = out * scales[:, None]
        return scaled if self.bias is None else scaled.add_(self.bias)


class Int8Conv2d(_Int8Layer):
    """A Conv2d as oneDNN int8, same scheme as ``Int8Linear``."""

    def __init__(self, conv: nn.Conv2d, spec: LayerSpec):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("the x86 backend's Conv2d takes numeric zero padding only")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding = list(conv.stride), list(conv.padding)  # type: ignore[arg-type]
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self._init_buffers(conv.out_channels, tuple(conv.weight.shape), spec, conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.activations is None:
            w = self.dequantized_weight().to(x.dtype)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        onednn = torch.ops.onednn
        if self.spec.granularity == "token":  # no tokens in NCHW: dynamic, per tensor
            scale = float(x.abs().amax().clamp(min=1e-8)) / QMAX
        else:
            scale = float(self.input_scale)
        if self._packed is None:
            self._packed = onednn.qconv_prepack(
                self.weight_int8, self.weight_scale, scale, ZERO_POINT,
                self.stride, self.padding, self.dilation, self.groups, None,
            )  # fmt: skip
        xq = self._quantized(x.float(), scale)
        out = onednn.qconv_pointwise(
            xq, scale, ZERO_POINT, self._packed, self.weight_scale, self._zero_points, self.bias,
            self.stride, self.padding, self.dilation, self.groups,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return out.to(x.dtype)


def _empty(layer: nn.Module, spec: LayerSpec) -> _Int8Layer:
    if isinstance(layer, nn.Linear):
        return Int8Linear(layer.in_features, layer.out_features, spec, layer.bias is not None)
    if isinstance(layer, nn.Conv2d):
        return Int8Conv2d(layer, spec)
    raise ValueError(f"the x86 backend quantizes Linear and Conv2d layers, not {type(layer)}")


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_layers(
    model: nn.Module,
    specs: dict[str, LayerSpec],
    ranges: Mapping[str, InputRange],
    smoothing: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerSpec]:
    """Replace ``specs`` in ``model`` by int8 layers: smooth, quantize the weights, set the
    calibrated input scale (``ranges``: input absmax per layer)."""
    device = str(next(model.parameters()).device)
    for name, spec in specs.items():
        check(spec, device)
        layer = model.get_submodule(name)
        new = _empty(layer, spec)
        if smoothing and name in smoothing:
            install_smoothing(layer, smoothing[name])
            attach_smoothing(new, getattr(layer, SMOOTH_BUFFER).detach().clone())
        new.set_weight(_tensor(layer, "weight"), getattr(layer, "bias", None))
        if spec.activations is not None and spec.granularity != "token":
            if name not in ranges:
                raise ValueError(f"{name} has static activations but no calibrated range")
            r = ranges[name]
            scales = r.absmax.float().clamp(min=1e-8) / QMAX
            new.input_scale.fill_(float(scales.max()))
            if spec.granularity == "timestep":
                if r.edges is None:
                    raise ValueError(f"{name} is calibrated per tensor, not per timestep range")
                new.register_buffer(RANGE_SCALES, scales.clone())
                new.register_buffer(RANGE_EDGES, r.edges.float().clone())
        _swap(model, name, new)
    install_ranges(model)
    return dict(specs)


def prepare(model: nn.Module, plan: dict[str, LayerPlan]) -> dict[str, LayerSpec]:
    """The structure a saved plan needs, weights not loaded (zeros, replaced on load)."""
    for name, lp in plan.items():
        check(lp.spec)
        layer = model.get_submodule(name)
        new = _empty(layer, lp.spec)
        if lp.smoothing_alpha is not None:
            in_dim = int(_tensor(layer, "weight").shape[1])
            attach_smoothing(new, torch.ones(in_dim))
        if lp.spec.granularity == "timestep":  # as many ranges as were calibrated: set on load
            new.register_buffer(RANGE_SCALES, torch.ones(TIME_RANGES))
            new.register_buffer(RANGE_EDGES, torch.zeros(TIME_RANGES - 1))
        _swap(model, name, new)
    install_ranges(model)
    return {n: lp.spec for n, lp in plan.items()}


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _Int8Layer)


def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    return {n: m.spec for n, m in model.named_modules() if isinstance(m, _Int8Layer)}


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def nbytes(module: nn.Module) -> int:
    """Bytes of a module's saved tensors (int8 weights, scales, biases, smoothing scales)."""
    return sum(v.numel() * v.element_size() for v in module.state_dict().values())


def state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors; nothing else is needed to rebuild them on a ``prepare``d model."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if v is not None}, {}


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """Load a saved state into a model ``prepare``d by the same plan; every key must match."""
    check_keys(model.state_dict(), tensors)
    size_ranges(model, tensors)
    model.load_state_dict(tensors, strict=True)
    install_ranges(model)


def versions() -> dict[str, str]:
    return {"torch": torch.__version__}  # oneDNN comes with torch
