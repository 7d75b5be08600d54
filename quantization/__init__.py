"""Post-training quantization of diffusion denoisers, driven by SQNR (docs/quantization.md).

    from quantization import load_quantized, open_source, quantize

    done = quantize(open_source("models/dit-digits"), "w8a8")
    done.save("artifacts/dit-digits-w8a8")
    pipe = load_quantized("artifacts/dit-digits-w8a8")

The names below load on first use, so ``quantization.types`` and ``quantization.plan`` (the
vocabulary, plans and the planner) stay importable without torch.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "QuantizeOptions",
    "Quantized",
    "analyze_pipeline",
    "load_quantized",
    "open_source",
    "quantize",
    "quantize_from_analysis",
]


def __getattr__(name: str):
    if name == "ArtifactError":
        from quantization.artifact import ArtifactError

        return ArtifactError
    if name == "QuantizeOptions":
        from quantization.options import QuantizeOptions

        return QuantizeOptions
    if name in __all__:
        from quantization import api

        return getattr(api, name)
    raise AttributeError(f"module 'quantization' has no attribute {name!r}")
