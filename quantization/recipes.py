"""The named recipes: a recipe travels as a string ("w4a8-sqnr") and resolves here."""

from __future__ import annotations

from dataclasses import dataclass

from quantization.backend import LayerSpec

__all__ = ["LEVELS", "RECIPES", "Recipe", "get_recipe", "level_spec"]


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    weights: str
    activations: str | None
    group_size: int | None = None
    mixed_precision: bool = False  # global treatment: promote sensitive blocks (planner)
    smoothing: bool = False  # local treatment: SmoothQuant on quantization-sensitive layers
    protect_time_sensitive: bool = False  # local treatment: their activations stay float

    def base_spec(self) -> LayerSpec:
        return LayerSpec(self.weights, self.activations, self.group_size)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("w8a8", "int8 weights per output channel, int8 activations", "qint8", "qint8"),
        Recipe("w8a16", "int8 weights per output channel, float activations", "qint8", None),
        Recipe(
            "w4a16-g128",
            "int4 weights in groups of 128 along the input, float activations",
            "qint4",
            None,
            128,
        ),
        Recipe(
            "w4a8-g128",
            "int4 weights in groups of 128, int8 activations (uniform baseline)",
            "qint4",
            "qint8",
            128,
        ),
        Recipe(
            "w4a8-sqnr",
            "w4a8-g128 base; SQNR-driven mixed precision promotes the most sensitive blocks "
            "(w4a8 -> w8a8 -> w8a16 -> float) to a target SQNR; SmoothQuant on the "
            "quantization-sensitive layers; time-sensitive layers keep float activations",
            "qint4",
            "qint8",
            128,
            mixed_precision=True,
            smoothing=True,
            protect_time_sensitive=True,
        ),
        Recipe("fp8", "float8 e4m3 weights and activations", "qfloat8_e4m3fn", "qfloat8_e4m3fn"),
    )
}

# Precision levels of the global treatment, from the base recipe up; None = left in float.
LEVELS = ("w4a8", "w8a8", "w8a16", "float")


def level_spec(level: str, group_size: int | None) -> LayerSpec | None:
    return {
        "w4a8": LayerSpec("qint4", "qint8", group_size),
        "w8a8": LayerSpec("qint8", "qint8"),
        "w8a16": LayerSpec("qint8", None),
        "float": None,
    }[level]


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
