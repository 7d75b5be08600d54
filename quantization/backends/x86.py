"""The x86 backend: int8 Linear and Conv2d layers on oneDNN's kernels, on CPUs, eager or
compiled.

Each quantized layer becomes an ``Int8Linear`` / ``Int8Conv2d`` that holds plain tensors: the
int8 weight (symmetric, one scale per output channel), its scales, the float bias and, for
static activations, *our* calibrated input scale and zero point. At run time the input is
quantized to uint8 and multiplied by oneDNN's ``qlinear_pointwise`` / ``qconv_pointwise``
(``quantization.backends.x86_kernels``: two custom ops, weights packed once on first use):
u8 × s8 with int32 accumulation, the VNNI instructions of AVX-512 CPUs (AMX where the CPU has
it). The input's scale and the bias are applied to the kernel's float output.

Static scales are asymmetric where the calibrated range is (its minimum and maximum: the
zero point sits where 0 falls in [0, 255]): the inputs of most layers follow a SiLU or a GELU,
whose negative side is small, and a symmetric scale would leave half the codes unused (SD 1.5
UNet shape, random weights: 25.7 -> 28.4 dB). Statistics saved without minima give symmetric
scales around 128.

Eager, aten's fused ``quantize_per_tensor`` quantizes the input. Under ``torch.compile`` the
kernels stay opaque extern calls and Inductor fuses the quantizing of their inputs (and the
scaling of their outputs) with the ops around them: ``load_quantized(path, compile=True)``.
Why not PyTorch 2 Export with the x86 Inductor quantizer: on torch 2.13 its lowering of
quantized convolutions fails to compile (``UnsupportedOperatorException:
onednn.qconv_prepack.default``, in torch's own PT2E flow too), its lowering of ``qlinear``
wants the packed weight frozen into the graph, and a frozen graph wrote into its own input (a
residual add lowered to an in-place ``sum`` post-op on a graph input:
../shared/TORCHAO_NOTES.md). Ours keeps the artifact a plain state dict and every input
tensor as it was.

Levels: w8a8 with static activations, one scale per tensor or one per timestep range (the
denoiser's pre-hook in ``quantization.activations`` puts the range's scale in place before
each call), or dynamic (granularity "token": per token on Linear layers, each row quantized
by its own scale and the row's scale applied to the kernel's output; per tensor on Conv2d,
whose NCHW input has no tokens); and w8a16 (int8 weights, dequantized per call
into a float matmul); and bf16 (``Bf16Linear`` / ``Bf16Conv2d``: weights kept in bfloat16,
the input cast to it and the output cast back, oneDNN's bf16 kernels: on a CPU with AVX-512
BF16, faster than float32 and slower than int8, and far less noisy than int8; on a CPU
without bf16 in hardware, the weights cast to float32 at each call and the product
float32's). int4 weights are the quanto backend's. SmoothQuant divides the input by ``s``
in a pre-hook (``quantization.activations``) and the weight's columns were multiplied by
``s`` before quantizing. Attention's matmuls, norms and activations stay float32 (torch's
bf16 attention was no faster on this CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import quantization.backends.x86_kernels as kernels
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
    "Bf16Conv2d",
    "Bf16Linear",
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
ZERO_POINT = kernels.ZERO_POINT
QMAX = 127.0


def check(spec: LayerSpec, device: str = "cpu") -> None:
    """Raise ValueError if this backend cannot quantize a layer so on ``device``."""
    if not device.startswith("cpu"):
        raise ValueError(f"the x86 backend runs oneDNN's CPU kernels, not on {device}")
    if spec.weights not in ("int8", "bf16"):
        raise ValueError(
            f"the x86 backend has int8 and bf16 weights only, not {spec.weights}: use --backend "
            "quanto for int4 (torchao's x86 wheel ships no int4 CPU kernels)"
        )


class _Int8Layer(nn.Module):
    """Shared by both layer types: buffers, static input scales, the spec (the packed weights
    live in ``x86_kernels``)."""

    spec: LayerSpec
    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    zero_point: int

    def _init_buffers(self, out_ch: int, weight_shape: tuple[int, ...], spec: LayerSpec, bias):
        self.spec = spec
        self.register_buffer("weight_int8", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_ch))
        self.register_buffer("bias", None if bias is None else torch.zeros(out_ch))
        # static inputs: uint8 = round(x / input_scale) + zero_point (asymmetric where the
        # calibrated range is); the zero point is one per layer, also across timestep ranges,
        # and a plain int at run time (a compiled graph takes it as a constant)
        self.zero_point = _code_zero(ZERO_POINT)
        if spec.activations is not None and spec.granularity != "token":
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.tensor(ZERO_POINT))

    def set_input_range(self, r: InputRange, timestep: bool) -> None:
        """Static scales from a calibrated range: asymmetric from its minimum and maximum where
        the statistics have them (zero point in [0, 255]), else symmetric around 128."""
        if r.low is None or r.high is None:
            zero_point, scales = ZERO_POINT, r.absmax.float().clamp(min=1e-8) / QMAX
        else:
            low, high = r.low.float(), r.high.float()
            span = float(high.max() - low.min())
            zero_point = min(255, max(0, round(255 * float(-low.min()) / max(span, 1e-12))))
            # each range's scale fits both its ends around the shared zero point
            up = high / (255 - zero_point) if zero_point < 255 else torch.zeros_like(high)
            down = -low / zero_point if zero_point > 0 else torch.zeros_like(low)
            scales = torch.maximum(up, down).clamp(min=1e-8)
        self.input_zero_point.fill_(zero_point)
        self.zero_point = _code_zero(zero_point)
        self.input_scale.fill_(float(scales.max()))
        if timestep:
            if r.edges is None:
                raise ValueError("a range calibrated per tensor, not per timestep range")
            self.register_buffer(RANGE_SCALES, scales.clone())
            self.register_buffer(RANGE_EDGES, r.edges.float().clone())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if hasattr(self, "input_zero_point"):
            self.zero_point = _code_zero(int(self.input_zero_point))

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-12) / QMAX
        shape = [-1] + [1] * (w.dim() - 1)
        self.weight_int8.copy_(torch.round(w / scale.view(shape)).clamp(-128, 127))
        self.weight_scale.copy_(scale)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.detach().float())

    def dequantized_weight(self) -> torch.Tensor:
        shape = [-1] + [1] * (self.weight_int8.dim() - 1)
        return self.weight_int8.float() * self.weight_scale.view(shape)

    def _quantized(self, x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` as uint8 around ``self.zero_point`` and its scale: the calibrated one
        (static), one per row of a 2-D ``x`` (``per_row``) or one for the tensor, found now
        (dynamic, symmetric: around 128). On a CPU without VNNI the codes span 0..127
        (``kernels.U8_MAX``): the same range in half the codes, twice the scale.

        Eager: aten's fused per-tensor kernel (one pass, ~9x faster here than the decomposed
        op's five) and four in-place passes per row (~7x faster than aten's per-channel op).
        Compiled: plain ops, which Inductor fuses into one loop with the op before."""
        if self.spec.granularity != "token":
            scale = self.input_scale
        elif per_row:
            scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / QMAX
        else:
            scale = x.abs().amax().clamp(min=1e-8) / QMAX
        zp, top = self.zero_point, kernels.U8_MAX
        if top != 255:
            scale = scale * (255 / top)
        if torch.compiler.is_compiling():
            return (x / scale).round().add(zp).clamp(0, top).to(torch.uint8), scale
        if scale.dim() == 0 and top == 255:
            return torch.quantize_per_tensor(x, float(scale), zp, torch.quint8).int_repr(), scale
        return (x / scale).round_().add_(zp).clamp_(0, top).to(torch.uint8), scale


def _code_zero(zero_point: int) -> int:
    """A calibrated zero point (of codes 0..255) in this CPU's codes (``kernels.U8_MAX``)."""
    return round(zero_point * kernels.U8_MAX / 255)


class _Conv:
    """A convolution's channels, stride, padding, dilation and groups, on its replacement."""

    in_channels: int
    out_channels: int
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int

    def _take_geometry(self, conv: nn.Conv2d) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("the x86 backend's Conv2d takes numeric zero padding only")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding = list(conv.stride), list(conv.padding)  # type: ignore[arg-type]
        self.dilation, self.groups = list(conv.dilation), conv.groups


def _scaled(raw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's output times the input's scale, plus the bias: one pass."""
    return raw.mul_(scale) if bias is None else torch.addcmul(bias, raw, scale)


class Int8Linear(_Int8Layer):
    """A Linear as oneDNN int8: u8 inputs × s8 weights per output channel."""

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(out_features, (out_features, in_features), spec, True if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.activations is None:
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        lead = x.shape[:-1]
        xq, scale = self._quantized(x.reshape(-1, self.in_features).float(), per_row=True)
        raw = kernels.linear(xq, self.zero_point, self.weight_int8, self.weight_scale)
        return _scaled(raw, scale, self.bias).reshape(*lead, self.out_features).to(x.dtype)


class Int8Conv2d(_Conv, _Int8Layer):
    """A Conv2d as oneDNN int8, same scheme as ``Int8Linear`` (dynamic scales: per tensor,
    an NCHW input has no tokens)."""

    def __init__(self, conv: nn.Conv2d, spec: LayerSpec):
        super().__init__()
        self._take_geometry(conv)
        self._init_buffers(conv.out_channels, tuple(conv.weight.shape), spec, conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.activations is None:
            w = self.dequantized_weight().to(x.dtype)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        xq, scale = self._quantized(x.float(), per_row=False)
        raw = kernels.conv2d(
            xq, self.zero_point, self.weight_int8, self.weight_scale,
            self.stride, self.padding, self.dilation, self.groups,
        )  # fmt: skip
        bias = None if self.bias is None else self.bias.view(-1, 1, 1)
        return _scaled(raw, scale, bias).to(x.dtype)


class _Bf16Layer(nn.Module):
    """A layer whose weight and bias are kept in bfloat16. On a CPU that multiplies bf16 in
    hardware (``x86_kernels.NATIVE_BF16``) it computes in bf16: its input cast to bf16 and its
    output cast back to the input's dtype (under ``torch.compile`` both casts fuse with the ops
    around). On one that does not, oneDNN's bf16 product is a software conversion many times
    slower than float32's, so the weight and bias are cast to the input's dtype at each call
    and the product is float32's: the same stored weights, the bytes at rest unchanged, the
    input no longer rounded to bf16 (closer to the float model than bf16 compute, not
    bit-identical to it)."""

    hardware_bf16: bool = kernels.NATIVE_BF16

    spec: LayerSpec
    weight: torch.Tensor
    bias: torch.Tensor | None

    def _init_buffers(self, weight_shape: tuple[int, ...], spec: LayerSpec, bias: bool) -> None:
        self.spec = spec
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.bfloat16))
        out = weight_shape[0]
        self.register_buffer("bias", torch.zeros(out, dtype=torch.bfloat16) if bias else None)

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight.copy_(weight.detach())
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.detach())

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float()


class Bf16Linear(_Bf16Layer):
    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers((out_features, in_features), spec, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hardware_bf16:
            return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Bf16Conv2d(_Conv, _Bf16Layer):
    def __init__(self, conv: nn.Conv2d, spec: LayerSpec):
        super().__init__()
        self._take_geometry(conv)
        self._init_buffers(tuple(conv.weight.shape), spec, conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hardware_bf16:
            y = F.conv2d(
                x.to(torch.bfloat16), self.weight, self.bias,
                self.stride, self.padding, self.dilation, self.groups,
            )  # fmt: skip
            return y.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(
            x, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups
        )


def _empty(layer: nn.Module, spec: LayerSpec) -> _Int8Layer | _Bf16Layer:
    if spec.weights == "bf16":
        if isinstance(layer, nn.Linear):
            return Bf16Linear(layer.in_features, layer.out_features, spec, layer.bias is not None)
        if isinstance(layer, nn.Conv2d):
            return Bf16Conv2d(layer, spec)
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
    calibrated input scale and zero point (``ranges``: each static layer's calibrated input
    range)."""
    device = str(next(model.parameters()).device)
    for name, spec in specs.items():
        check(spec, device)
        layer = model.get_submodule(name)
        new = _empty(layer, spec)
        if smoothing and name in smoothing:
            install_smoothing(layer, smoothing[name])
            attach_smoothing(new, getattr(layer, SMOOTH_BUFFER).detach().clone())
        new.set_weight(_tensor(layer, "weight"), getattr(layer, "bias", None))
        if (
            isinstance(new, _Int8Layer)
            and spec.activations is not None
            and spec.granularity != "token"
        ):
            if name not in ranges:
                raise ValueError(f"{name} has static activations but no calibrated range")
            try:
                new.set_input_range(ranges[name], spec.granularity == "timestep")
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
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
    return isinstance(module, (_Int8Layer, _Bf16Layer))


def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    return {n: m.spec for n, m in model.named_modules() if is_quantized(m)}


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def nbytes(module: nn.Module) -> int:
    """Bytes of a module's saved tensors (int8 or bf16 weights, scales, biases, smoothing
    scales)."""
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
    return {"torch": torch.__version__, "kernels": kernels.KERNELS}  # oneDNN comes with torch
