"""The model registry: which models and variants the service serves, read from one TOML file.

Read with JSON and TOML only (no torch), so the API can validate requests and describe models;
the worker resolves the same entries into a pipeline.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from app.labels import Match, find_class, label_key
from pipelines.schedulers import names_for

__all__ = [
    "CLASS_CONDITIONAL",
    "DTYPES",
    "TEXT_TO_IMAGE",
    "ModelSpec",
    "Registry",
    "RegistryError",
    "VariantSpec",
    "WorkerSpec",
    "load_registry",
    "parse_bytes",
]

DTYPES = ("fp32", "fp16", "bf16")
CLASS_CONDITIONAL = "class-conditional"
TEXT_TO_IMAGE = "text-to-image"
_CLASS_PIPELINES = {"DiTPipeline"}
# pipelines whose components diffusers' image-to-image and inpainting pipelines take
# (``pipelines.edit``); DiT gets our image-to-image and no inpainting
_EDITABLE = {
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
}


class RegistryError(ValueError):
    """The registry file is malformed or names something that is not there."""


@dataclass(frozen=True)
class VariantSpec:
    name: str
    dtype: str = "fp32"
    artifact: Path | None = None  # a quantized artifact folder; None for full precision
    require_worker: bool = False  # refuse jobs (503) while no worker is live, instead of queueing
    compile: bool = False  # the worker compiles the denoiser (torch.compile) and warms it up
    manifest: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def quantized(self) -> bool:
        return self.artifact is not None

    def path(self) -> dict[str, str]:
        """How the variant runs, as the latency panels tell paths apart: its backend ("float"
        for full precision), its recipe (its dtype for full precision), compiled or not."""
        compiled = str(self.compile).lower()
        if not self.quantized:
            return {"backend": "float", "recipe": self.dtype, "compiled": compiled}
        return {
            "backend": str(self.manifest.get("backend") or "unknown"),
            "recipe": str(self.manifest.get("recipe", {}).get("name") or "unknown"),
            "compiled": compiled,
        }

    def summary(self) -> dict:
        """What ``GET /v1/models`` says of the variant: bytes, bits plan, measured quality."""
        if not self.quantized:
            return {
                "id": self.name,
                "quantized": False,
                "dtype": self.dtype,
                "require_worker": self.require_worker,
                "compile": self.compile,
            }
        m = self.manifest
        levels: dict[str, int] = {}
        for layer in m.get("layers", {}).values():
            key = f"w:{layer['weights']}/a:{layer['activations']}"
            if layer.get("granularity") == "token":
                key += "/token"
            levels[key] = levels.get(key, 0) + 1
        return {
            "id": self.name,
            "quantized": True,
            "dtype": m.get("dtype", self.dtype),
            "require_worker": self.require_worker,
            "compile": self.compile,
            "recipe": m.get("recipe", {}).get("name"),
            "backend": m.get("backend"),
            "denoiser_weight_bytes": m.get("sizes", {}).get("denoiser_weight_bytes"),
            "ratio_to_fp16": m.get("sizes", {}).get("ratio_to_fp16"),
            "layers_by_qtype": dict(sorted(levels.items())),
            "calibration": m.get("calibration", {}).get("kind"),
            "measured": m.get("measured", {}),
        }


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # a local folder (absolute) or a hub id
    kind: str  # CLASS_CONDITIONAL or TEXT_TO_IMAGE
    variants: dict[str, VariantSpec]
    default_variant: str
    device: str = "cpu"
    default_steps: int = 20
    max_steps: int = 100
    guidance: float = 5.0
    guidance_range: tuple[float, float] = (1.0, 20.0)
    sizes: tuple[str, ...] = ("32x32",)
    labels: dict[str, int] = field(default_factory=dict, repr=False)  # class name -> id
    shadow_prompt: str | None = None  # what background shadow compares ask for
    scheduler: str | None = None  # the sampler the folder's pipeline uses (None: unknown)
    pipeline: str | None = None  # the folder's pipeline class (model_index.json)

    @property
    def schedulers(self) -> list[str]:
        """The sampler names a request may ask for (``pipelines.schedulers``)."""
        return names_for(self.kind == CLASS_CONDITIONAL, self.scheduler)

    @property
    def edits(self) -> bool:
        """Image-to-image: an input image noised to a strength and denoised."""
        return self.pipeline in _EDITABLE or self.pipeline in _CLASS_PIPELINES

    @property
    def inpainting(self) -> bool:
        return self.pipeline in _EDITABLE

    def class_id(self, prompt: str) -> int | None:
        """The class a class-conditional prompt names ("a seven", "the digit 7, please",
        "Seven!"), else None (no class, or several: ``find_class`` says which)."""
        return self.find_class(prompt).class_id

    def find_class(self, prompt: str) -> Match:
        return find_class(prompt, self.labels)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process's share of the registry: the variants it hosts on one device, and
    how many bytes of weights it may hold at once (None: all of them, loaded at start)."""

    name: str
    device: str
    variants: tuple[tuple[str, str], ...]  # (model, variant), in registry order
    memory_budget: int | None = None
    pinned: frozenset[tuple[str, str]] = frozenset()  # never evicted, loaded at start


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec]
    path: Path
    workers: dict[str, WorkerSpec] = field(default_factory=dict)

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def served(self) -> list[tuple[str, str]]:
        """Every (model, variant), in registry order."""
        return [(m, v) for m, spec in self.models.items() for v in spec.variants]


def load_registry(path: str | Path) -> Registry:
    """Parse and check the registry; an error names the entry at fault."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"cannot read the registry {path}: {exc}") from exc
    entries = raw.get("models")
    if not isinstance(entries, dict) or not entries:
        raise RegistryError(f"{path}: no [models.NAME] entries")
    models = {name: _model(name, entry, path.parent) for name, entry in entries.items()}
    tables = raw.get("workers", {})
    if not isinstance(tables, dict):
        raise RegistryError(f"{path}: workers must be [workers.NAME] tables")
    workers = {n: _worker(n, e, models) for n, e in tables.items()} or _default_workers(models)
    return Registry(models, path, workers)


def _default_workers(models: dict[str, ModelSpec]) -> dict[str, WorkerSpec]:
    """Without [workers.NAME] tables: one worker per device, hosting every variant there."""
    by_device: dict[str, list[tuple[str, str]]] = {}
    for m, spec in models.items():
        by_device.setdefault(spec.device, []).extend((m, v) for v in spec.variants)
    return {d: WorkerSpec(d, d, tuple(targets)) for d, targets in by_device.items()}


def _worker(name: str, entry: dict, models: dict[str, ModelSpec]) -> WorkerSpec:
    where = f"workers.{name}"
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: must be a table")
    unknown = set(entry) - {"device", "variants", "memory_budget", "pin"}
    if unknown:
        raise RegistryError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    device = entry.get("device", "cpu")
    everything = [(m, v) for m, spec in models.items() for v in spec.variants]
    if "variants" in entry:
        hosted = _matching(where, "variants", entry["variants"], everything)
    else:  # every variant of the device
        hosted = [(m, v) for m, v in everything if models[m].device == device]
    for m, v in hosted:
        if models[m].device.split(":")[0] != device.split(":")[0]:
            raise RegistryError(f"{where}: {m}/{v} runs on {models[m].device}, not {device}")
    pinned = _matching(where, "pin", entry.get("pin", []), hosted)
    budget = entry.get("memory_budget")
    try:
        budget = None if budget is None else parse_bytes(budget)
    except ValueError as exc:
        raise RegistryError(f"{where}: memory_budget: {exc}") from None
    return WorkerSpec(name, device, tuple(hosted), budget, frozenset(pinned))


def _matching(
    where: str, key: str, patterns: object, among: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The (model, variant) pairs that "MODEL/VARIANT" patterns (shell wildcards) name, in
    registry order; a pattern that names nothing is an error."""
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise RegistryError(f'{where}: {key} must be a list of "MODEL/VARIANT" patterns')
    chosen = set()
    for pattern in patterns:
        if pattern.count("/") != 1:
            raise RegistryError(f'{where}: {key}: {pattern!r} is not "MODEL/VARIANT"')
        found = {t for t in among if fnmatch.fnmatchcase(f"{t[0]}/{t[1]}", pattern)}
        if not found:
            raise RegistryError(f"{where}: {key}: {pattern!r} names no variant it can host")
        chosen |= found
    return [t for t in among if t in chosen]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: object) -> int:
    """Bytes from an int or a string like "1.5GiB", "800 MB", "2e9"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{value!r} is not a size (e.g. 2GiB, 800MB, 1500000000)")
        try:
            value = float(match.group(1)) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"{value!r} is not a size") from None
    if value <= 0:
        raise ValueError(f"{value!r} must be positive")
    return int(value)


def _model(name: str, entry: dict, base: Path) -> ModelSpec:
    where = f"models.{name}"
    if "source" not in entry:
        raise RegistryError(f"{where}: no source")
    source = _resolve(entry["source"], base)
    folder = Path(source) if Path(source).is_dir() else None
    defaults = _read_json(folder / "defaults.json") if folder else {}
    index = _read_json(folder / "model_index.json") if folder else {}
    kind = entry.get("kind") or defaults.get("kind")
    if kind is None:
        kind = CLASS_CONDITIONAL if index.get("_class_name") in _CLASS_PIPELINES else TEXT_TO_IMAGE
    if kind not in (CLASS_CONDITIONAL, TEXT_TO_IMAGE):
        raise RegistryError(f"{where}: kind must be {CLASS_CONDITIONAL!r} or {TEXT_TO_IMAGE!r}")
    switches = {k: entry.get(k, False) for k in _SWITCHES}  # the model's, for its variants
    variants = {
        v: _variant(f"{where}.variants.{v}", v, e, base, switches) for v, e in _variants(entry)
    }
    default_variant = entry.get("default_variant", next(iter(variants)))
    if default_variant not in variants:
        raise RegistryError(f"{where}: default_variant {default_variant!r} is not a variant")
    height, width = defaults.get("height"), defaults.get("width")
    sizes = tuple(entry.get("sizes") or ([f"{width}x{height}"] if height else ["512x512"]))
    for size in sizes:
        _parse_size(size, where)
    low, high = (float(x) for x in entry.get("guidance_range", (1.0, 20.0)))
    spec = ModelSpec(
        name=name,
        source=source,
        kind=kind,
        variants=variants,
        default_variant=default_variant,
        device=entry.get("device", "cpu"),
        default_steps=int(entry.get("default_steps", defaults.get("num_inference_steps", 20))),
        max_steps=int(entry.get("max_steps", 100)),
        guidance=float(entry.get("guidance", defaults.get("guidance_scale", 5.0))),
        guidance_range=(low, high),
        sizes=sizes,
        labels=_labels(folder) if kind == CLASS_CONDITIONAL and folder else {},
        shadow_prompt=entry.get("shadow_prompt"),
        scheduler=_scheduler(folder),
        pipeline=index.get("_class_name"),
    )
    if not 1 <= spec.default_steps <= spec.max_steps:
        raise RegistryError(f"{where}: default_steps must lie in 1..max_steps")
    if not low <= spec.guidance <= high:
        raise RegistryError(f"{where}: guidance {spec.guidance} is outside guidance_range")
    if kind == CLASS_CONDITIONAL and not spec.labels:
        raise RegistryError(f"{where}: a class-conditional model needs id2label.json in {source}")
    if (
        kind == CLASS_CONDITIONAL
        and spec.shadow_prompt
        and spec.class_id(spec.shadow_prompt) is None
    ):
        raise RegistryError(f"{where}: shadow_prompt {spec.shadow_prompt!r} names no class")
    return spec


def _variants(entry: dict):
    variants = entry.get("variants") or {"fp32": {"dtype": "fp32"}}
    if not isinstance(variants, dict):
        raise RegistryError("variants must be a table")
    return variants.items()


_SWITCHES = ("require_worker", "compile")  # true/false, on a model (its default) or a variant


def _variant(where: str, name: str, entry: dict, base: Path, defaults: dict) -> VariantSpec:
    switches = {k: entry.get(k, defaults[k]) for k in _SWITCHES}
    for key, value in switches.items():
        if not isinstance(value, bool):
            raise RegistryError(f"{where}: {key} must be true or false")
    if "artifact" in entry:
        folder = Path(_resolve(entry["artifact"], base))
        manifest_file = folder / "manifest.json"
        if not manifest_file.is_file():
            raise RegistryError(f"{where}: {folder} is not a quantized artifact (no manifest.json)")
        manifest = _read_json(manifest_file)
        return VariantSpec(
            name, manifest.get("dtype", "fp32"), folder, **switches, manifest=manifest
        )
    dtype = entry.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise RegistryError(f"{where}: dtype must be one of {', '.join(DTYPES)}")
    return VariantSpec(name, dtype, **switches)


def _resolve(value: str, base: Path) -> str:
    """A path relative to the registry file when it exists there; otherwise as given (hub id)."""
    candidate = Path(value) if Path(value).is_absolute() else base / value
    return str(candidate.resolve()) if candidate.exists() else value


def _scheduler(folder: Path | None) -> str | None:
    config = folder / "scheduler" / "scheduler_config.json" if folder else None
    return _read_json(config).get("_class_name") if config and config.is_file() else None


def _labels(folder: Path) -> dict[str, int]:
    labels: dict[str, int] = {}
    for class_id, names in _read_json(folder / "id2label.json").items():
        for key in map(label_key, str(names).split(",")):
            if key:
                labels[key] = int(class_id)
    return labels


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: {exc}") from exc


def _parse_size(size: str, where: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise RegistryError(f"{where}: size {size!r} is not WxH") from None
    return width, height
