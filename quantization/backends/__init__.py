"""The quantization backends, one module each, behind one interface:

    check(spec, device)                 ValueError if the backend cannot quantize a layer so
    quantize_layers(model, specs, calls, smoothing) -> applied specs
                                        in place: smooth, calibrate on ``calls``, quantize
    prepare(model, plan)                the structure of a saved plan, before its weights load
    state_dict(model) -> (tensors, metadata)   flat tensors for safetensors
    load_state(model, tensors, metadata)       strict: every key the plan needs, no other
    nbytes(module)                      bytes its saved tensors take in memory
    layer_specs(model), is_quantized(module), plain(tensor), versions()
    LAYERS, NAME                        the layer types it quantizes; its name

The method (sensitivity, planner, smoothing, calibration) speaks in plans and calls these
only, so it runs on either backend. ``quanto``: static per-tensor activations, int4 packed two
to a byte. ``torchao``: per-token dynamic or static int8 activations, fast under
``torch.compile``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from quantization.types import BACKENDS

__all__ = ["get", "tensor_bytes"]


def get(name: str) -> ModuleType:
    """The backend module called ``name`` ("quanto" or "torchao")."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return importlib.import_module(f"quantization.backends.{name}")


def tensor_bytes(tensors: dict, prefix: str = "") -> int:
    """Bytes of the plain tensors whose key starts with ``prefix``: the size on disk and in
    memory of what a backend's ``state_dict`` returns."""
    return sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(prefix))
