"""The package's vocabulary, torch-free: dtypes, layer specs, recipes and precision levels.

Reading a plan, a manifest or a recipe needs nothing else: neither torch nor a backend is
imported here, so the API process and the CLI's argument parsing stay light.

- weights: "int4" (groups along the input), "int8" (per output channel), "fp8" (e4m3),
  "bf16" (the layer computes in bfloat16: its input cast, its output cast back; the x86
  backend's, for the AVX-512 BF16 instructions of CPUs that have them)
- activations: None (float, or bf16 with bf16 weights), "int8", "fp8"
- granularity of the activation scales: "tensor" (one static scale per layer, calibrated),
  "timestep" (static, one calibrated scale per range of timesteps, chosen by the step's t),
  "token" (one scale per token, computed at run time: dynamic)
- backends: "quanto" (optimum-quanto; static per-tensor activations only), "torchao" and
  "x86" (oneDNN's int8 kernels on CPUs)
- model dtypes: "fp32", "bf16", "fp16"
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "DTYPES",
    "GRANULARITIES",
    "GROUP_SIZES",
    "LEVELS",
    "LEVEL_NAMES",
    "RECIPES",
    "STATIC",
    "TIME_RANGES",
    "WEIGHTS",
    "LayerSpec",
    "Recipe",
    "effective_group_size",
    "get_recipe",
    "level_spec",
]

WEIGHTS = ("int4", "int8", "fp8", "bf16")
ACTIVATIONS = ("int8", "fp8")
GRANULARITIES = ("tensor", "timestep", "token")
STATIC = ("tensor", "timestep")  # the granularities whose scales are calibrated
TIME_RANGES = 4  # "timestep": ranges of the schedule, each with its own scales
BACKENDS = ("quanto", "torchao", "x86")
DTYPES = ("fp32", "bf16", "fp16")
GROUP_SIZES = (32, 64, 128, 256)
GROUPED = ("int4",)


@dataclass(frozen=True)
class LayerSpec:
    """How one Linear / Conv2d layer is quantized.

    ``group_size=None``: one weight scale per output row. ``granularity`` says how activation
    scales are found: "tensor" (static, calibrated), "timestep" (static, one calibrated scale
    per range of the schedule) or "token" (dynamic); None when the activations stay float.
    """

    weights: str
    activations: str | None = None
    group_size: int | None = None
    granularity: str | None = "tensor"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, not {self.weights!r}")
        if self.weights == "bf16" and self.activations is not None:
            raise ValueError("bf16 layers compute in bf16: they take no quantized activations")
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise ValueError(
                f"activations must be one of {ACTIVATIONS} or none, not {self.activations!r}"
            )
        if self.group_size is not None:
            if self.weights not in GROUPED:
                raise ValueError(f"group_size applies to {GROUPED} weights, not {self.weights}")
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"group_size must be one of {GROUP_SIZES}, not {self.group_size}")
        if self.activations is None:
            object.__setattr__(self, "granularity", None)
        elif self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, not {self.granularity!r}"
            )

    @property
    def level(self) -> str:
        """The level's name: "w4a8", "w8a16", ... (bits of weights and activations), "bf16"."""
        if self.weights == "bf16":
            return "bf16"
        bits = {"int4": "4", "int8": "8", "fp8": "8"}
        return f"w{bits[self.weights]}a{'16' if self.activations is None else '8'}"


def effective_group_size(in_features: int, wanted: int | None) -> int | None:
    """The group size a layer really gets: ``wanted`` if it splits the rows, else per row."""
    if wanted is None or in_features <= wanted or in_features % wanted:
        return None
    return wanted


# Precision levels of the global treatment, from the most compact up; "float" = left as is.
LEVELS = ("w4a8", "w8a8", "w8a16", "float")
# Every level a recipe may list: also "w8a8t", int8 with dynamic per-token activations
# whatever the recipe's granularity (between static w8a8 and float, where the backend has it),
# and "bf16", the layer computed in bfloat16 (half float's bytes; on a CPU with AVX-512 BF16,
# faster than float).
LEVEL_NAMES = ("w4a8", "w8a8", "w8a8t", "w8a16", "bf16", "float")


def level_spec(level: str, group_size: int | None, granularity: str) -> LayerSpec | None:
    """The spec of a level of the global treatment; None for "float"."""
    if level not in LEVEL_NAMES:
        raise ValueError(f"level must be one of {LEVEL_NAMES}, not {level!r}")
    return {
        "w4a8": lambda: LayerSpec("int4", "int8", group_size, granularity),
        "w8a8": lambda: LayerSpec("int8", "int8", None, granularity),
        "w8a8t": lambda: LayerSpec("int8", "int8", None, "token"),
        "w8a16": lambda: LayerSpec("int8", None),
        "bf16": lambda: LayerSpec("bf16", None),
        "float": lambda: None,
    }[level]()


@dataclass(frozen=True)
class Recipe:
    """A named way to quantize a denoiser.

    ``levels``: the precision levels the SQNR-driven planner may give a block, the base first
    (none: uniform, every layer at the base spec, no planning). ``backend``: the default one
    (benchmarked best for it, docs/quantization-results.md); the CLI's --backend overrides it.
    """

    name: str
    summary: str
    weights: str
    activations: str | None
    group_size: int | None = None
    granularity: str = "tensor"
    levels: tuple[str, ...] = ()
    target_sqnr_db: float = 35.0  # the planner stops at this SQNR of the final latents
    budget_ratio: float = 1.2  # ... or at this many times the bytes of the uniform base
    smoothing: bool = False  # local treatment: SmoothQuant on quantization-sensitive layers
    protect_time_sensitive: bool = False  # local treatment: their activations stay float
    backend: str = "quanto"
    latency_cost: bool = False  # the planner prices levels by their latency on the device too

    def __post_init__(self) -> None:
        unknown = [lv for lv in self.levels if lv not in LEVEL_NAMES]
        if unknown:
            raise ValueError(f"recipe {self.name!r}: unknown levels {unknown}")

    @property
    def mixed_precision(self) -> bool:
        return len(self.levels) > 1

    def base_spec(self) -> LayerSpec:
        return LayerSpec(self.weights, self.activations, self.group_size, self.granularity)

    def with_granularity(self, granularity: str | None) -> Recipe:
        """The recipe with its activation scales found another way (the CLI's --granularity)."""
        if granularity is None or granularity == self.granularity:
            return self
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
        return replace(self, granularity=granularity)

    @property
    def static(self) -> bool:
        """Whether some level calibrates activation scales (or smooths, which needs ranges)."""
        specs = [level_spec(lv, self.group_size, self.granularity) for lv in self.levels]
        specs = specs or [self.base_spec()]
        return self.smoothing or any(
            s is not None and s.activations is not None and s.granularity != "token" for s in specs
        )


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "w8a8",
            "int8 weights per output channel, int8 activations per token (dynamic); the "
            "SQNR-driven planner keeps the activations of the blocks that need it in float "
            "(weights stay int8: no extra bytes)",
            "int8",
            "int8",
            granularity="token",
            levels=("w8a8", "w8a16", "float"),
            target_sqnr_db=34.0,
            budget_ratio=1.08,
            backend="torchao",
        ),
        Recipe(
            "w8a8-static",
            "int8 weights per output channel, int8 activations with one static scale per "
            "layer, calibrated (single-step by default)",
            "int8",
            "int8",
        ),
        Recipe(
            "w8a8-static-sqnr",
            "int8 weights per output channel, static int8 activations (asymmetric on x86); "
            "the SQNR-driven planner, pricing each level by its measured latency on the "
            "device and its bytes, moves the units that need it to per-token int8, bf16 or "
            "float, to a target end-to-end SQNR within 2x the base's bytes: the fast CPU path",
            "int8",
            "int8",
            levels=("w8a8", "w8a8t", "bf16", "float"),
            target_sqnr_db=30.0,
            budget_ratio=2.0,
            backend="x86",
            latency_cost=True,
        ),
        Recipe(
            "w8a16",
            "int8 weights per output channel, float activations",
            "int8",
            None,
            backend="torchao",
        ),
        Recipe(
            "w4a16-g128",
            "int4 weights in groups of 128 along the input, float activations",
            "int4",
            None,
            128,
        ),
        Recipe(
            "w4a8-g128",
            "int4 weights in groups of 128, int8 activations (uniform baseline)",
            "int4",
            "int8",
            128,
        ),
        Recipe(
            "w4a8-sqnr",
            "w4a8-g128 base; SQNR-driven mixed precision promotes the most sensitive modules "
            "(w4a8 -> w8a8 -> w8a16 -> float) to a target end-to-end SQNR within 1.2x the "
            "base's bytes; SmoothQuant on the quantization-sensitive layers; time-sensitive "
            "layers keep float activations",
            "int4",
            "int8",
            128,
            levels=LEVELS,
            target_sqnr_db=30.0,
            smoothing=True,
            protect_time_sensitive=True,
        ),
        Recipe("fp8", "float8 e4m3 weights and activations", "fp8", "fp8"),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
