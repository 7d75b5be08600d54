"""The quantization backends, one module each, behind one contract: ``Backend``.

The method (sensitivity, planner, smoothing, calibration) speaks in plans, layer specs and
calibrated input ranges and calls these only, so it runs on either backend. ``quanto``: static
per-tensor (or per timestep range) activations, int4 packed two to a byte. ``torchao``:
per-token dynamic or static int8 activations, fast under ``torch.compile``. ``x86``: int8
Linear and Conv2d on oneDNN's CPU kernels, static (asymmetric) or per-token activations, eager
or compiled. Each
backend module satisfies ``Backend`` as a module; the type checker holds them to it (below).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from quantization.activations import InputRange
from quantization.plan import LayerPlan
from quantization.types import BACKENDS, LayerSpec

__all__ = ["Backend", "get", "tensor_bytes"]


class Backend(Protocol):
    """What a quantization backend module provides."""

    NAME: str
    LAYERS: tuple[type[nn.Module], ...]  # the layer types it quantizes

    def check(self, spec: LayerSpec, device: str = "cpu") -> None:
        """Raise ValueError (naming the backend that can) if it cannot quantize a layer so."""
        ...

    def quantize_layers(
        self,
        model: nn.Module,
        specs: dict[str, LayerSpec],
        ranges: Mapping[str, InputRange],
        smoothing: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, LayerSpec]:
        """In place: smooth, set the calibrated input scales, quantize; the specs as applied."""
        ...

    def prepare(self, model: nn.Module, plan: dict[str, LayerPlan]) -> dict[str, LayerSpec]:
        """The structure a saved plan needs, before its weights are loaded."""
        ...

    def state_dict(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat tensors for safetensors, and the metadata that rebuilds them."""
        ...

    def load_state(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> None:
        """Strict: every key the plan needs, no other."""
        ...

    def nbytes(self, module: nn.Module) -> int:
        """Bytes its saved tensors take in memory."""
        ...

    def layer_specs(self, model: nn.Module) -> dict[str, LayerSpec]: ...

    def is_quantized(self, module: nn.Module) -> bool: ...

    def plain(self, t: torch.Tensor) -> torch.Tensor:
        """A plain float copy of a tensor the backend may have wrapped."""
        ...

    def versions(self) -> dict[str, str]: ...


if TYPE_CHECKING:  # the type checker holds each backend module to the contract
    from quantization.backends import quanto as _quanto
    from quantization.backends import torchao as _torchao
    from quantization.backends import x86 as _x86

    _quanto_is_a_backend: Backend = _quanto
    _torchao_is_a_backend: Backend = _torchao
    _x86_is_a_backend: Backend = _x86


def get(name: str) -> Backend:
    """The backend module called ``name`` (one of ``BACKENDS``), imported on first use."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return cast(Backend, importlib.import_module(f"quantization.backends.{name}"))


def tensor_bytes(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    """Bytes of the plain tensors whose key starts with ``prefix``: the size on disk and in
    memory of what a backend's ``state_dict`` returns."""
    return sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(prefix))
