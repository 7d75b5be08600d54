"""Post-training quantization of diffusion denoisers, driven by SQNR (see docs/quantization.md)."""
