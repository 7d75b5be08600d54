"""oneDNN's int8 GEMM and convolution as two custom ops, for the x86 backend's layers.

``linear(xq, zero_point, weight, weight_scale)`` and ``conv2d(xq, zero_point, weight,
weight_scale, ...)`` take the uint8 input and its zero point, the layer's int8 weight and its
per-output-channel scales, and return ``sum((xq - zero_point) * w) * weight_scale`` in
float32: the input's own scale (a static scale, one per token, one per tensor) and the bias
are applied by the caller to that output.
The ops are opaque to ``torch.compile``: Inductor keeps each as one extern kernel call and
fuses the elementwise work around it (quantizing the input, scaling the output, the bias,
the next activation), which it cannot do for oneDNN's ops with weights packed at run time
(its own lowering wants them frozen into the graph; ../shared/TORCHAO_NOTES.md).

Weights are packed for oneDNN once, on first use, and kept while the weight tensor lives
and is unchanged (its version counter): a reloaded or replaced weight is packed again.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["KERNELS", "NATIVE_BF16", "U8_MAX", "ZERO_POINT", "conv2d", "cpu_flags", "linear"]

ZERO_POINT = 128  # uint8 inputs centred on zero: [-128, 127] * scale
# CPU flags under which oneDNN multiplies u8 by s8 with int32 sums (VNNI, AMX)
VNNI_FLAGS = frozenset(("avx512_vnni", "avx_vnni", "amx_int8"))
# CPU flags under which oneDNN multiplies bfloat16 in hardware (AVX-512 BF16, AMX)
BF16_FLAGS = frozenset(("avx512_bf16", "amx_bf16"))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo's first ``flags`` line; empty where none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# The largest input code. Without VNNI (AVX2, AVX-512 without VNNI) oneDNN adds pairs of
# u8 x s8 products into int16 with saturation (vpmaddubsw): full-range uint8 inputs overflow
# it. Measured on an AVX2-only EPYC, a (64 x 512) x (512 x 256) product came out at 33.15 dB
# SQNR against 42.06 dB for the same codes multiplied exactly. With 7-bit inputs the pair sums
# fit (2 x 127 x 128 < 2^15) and the kernel is exact again: FBGEMM's ``reduce_range``.
# (``python -m bench.x86_codes`` measures both on the CPU it runs on.)
U8_MAX = 255 if cpu_flags() & VNNI_FLAGS else 127

# Whether bf16 products are the hardware's. Without AVX-512 BF16 or AMX, oneDNN converts bf16
# in software: on the AVX2-only EPYC a bf16 product of DiT-XL/2's or SD 1.5's shapes took 6.6
# to 9.6 times fp32's, and fp32's on the bf16 weight cast at each call 0.96 to 1.2 times
# (``python -m bench.cpu_gemm``, bench/results/cpu-gemm-no-vnni-no-bf16.md), so the x86
# backend's bf16 layers multiply in float32 there (``x86.Bf16Linear``).
NATIVE_BF16 = bool(cpu_flags() & BF16_FLAGS)

# What the x86 layers compute with on this CPU, in a line: recorded in a manifest's versions
# and part of the latency cache's device key, so timings of other kernels are not reused.
KERNELS = f"u8 codes 0..{U8_MAX}, bf16 {'in hardware' if NATIVE_BF16 else 'as float32'}"

# id(weight) -> (weak reference to it, its version when packed, packed weight, zero points)
_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor, torch.Tensor]] = {}


def _packed(weight: torch.Tensor, pack) -> tuple[torch.Tensor, torch.Tensor]:
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight._version:
        return entry[2], entry[3]
    packed = pack(weight)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)
    _PACKED[key] = (weakref.ref(weight, lambda _: _PACKED.pop(key, None)), weight._version,
                    packed, zero_points)  # fmt: skip
    return packed, zero_points


@torch.library.custom_op("t2i_x86::linear", mutates_args=())
def linear(
    xq: torch.Tensor, zero_point: int, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """(rows, in) uint8 x (out, in) int8 -> (rows, out) float32, weight scales applied."""
    packed, zero_points = _packed(weight, lambda w: torch.ops.onednn.qlinear_prepack(w, None))
    return torch.ops.onednn.qlinear_pointwise(
        xq, 1.0, zero_point, packed, weight_scale, zero_points, None,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


@linear.register_fake
def _(xq: torch.Tensor, zero_point: int, weight: torch.Tensor, weight_scale: torch.Tensor):
    return xq.new_empty((xq.shape[0], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("t2i_x86::conv2d", mutates_args=())
def conv2d(
    xq: torch.Tensor,
    zero_point: int,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """NCHW uint8 input, int8 weight -> NCHW float32 (channels-last strides), weight scales
    applied."""

    def pack(w: torch.Tensor) -> torch.Tensor:  # the input scale here only picks a layout
        return torch.ops.onednn.qconv_prepack(
            w, weight_scale, 1.0, ZERO_POINT, stride, padding, dilation, groups, None
        )

    packed, zero_points = _packed(weight, pack)
    out = torch.ops.onednn.qconv_pointwise(
        xq, 1.0, zero_point, packed, weight_scale, zero_points, None,
        stride, padding, dilation, groups, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip
    return out.contiguous(memory_format=torch.channels_last)  # oneDNN's own layout: no copy


@conv2d.register_fake
def _(xq, zero_point, weight, weight_scale, stride, padding, dilation, groups) -> torch.Tensor:
    n, _, h, w = xq.shape
    kh, kw = weight.shape[2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = xq.new_empty((n, weight.shape[0], oh, ow), dtype=torch.float32)
    return out.contiguous(memory_format=torch.channels_last)
