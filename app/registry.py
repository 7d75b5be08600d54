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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from app.labels import Match, find_class, label_key
from app.sizes import Size, parse_size
from pipelines.capabilities import Capabilities, capabilities
from pipelines.schedulers import names_for

__all__ = [
    "CLASS_CONDITIONAL",
    "DTYPES",
    "TEXT_TO_IMAGE",
    "AdapterSpec",
    "ModelSpec",
    "Registry",
    "RegistryError",
    "VariantSpec",
    "WorkerSpec",
    "load_registry",
    "parse_bytes",
]

DTYPES = ("fp32", "fp16", "bf16")
LORA_SCALE_LIMIT = 2.0  # a request's (and a default) adapter scale lies in [-limit, limit]
CLASS_CONDITIONAL = "class-conditional"
TEXT_TO_IMAGE = "text-to-image"


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
            # where "measured" was measured: an x86 variant gives less on a CPU without VNNI
            "measured_on": m.get("measured_on"),
        }


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter a model's requests may name (``lora``): its file, pinned by sha256 (the
    worker refuses a file whose bytes differ), and the scale a request that gives none gets."""

    name: str
    file: Path
    sha256: str
    scale: float = 1.0

    def summary(self) -> dict:
        """What ``GET /v1/models`` says of it."""
        return {
            "name": self.name,
            "scale": self.scale,
            "sha256": self.sha256,
            "bytes": self.file.stat().st_size if self.file.is_file() else None,
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
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)  # LoRA, by name
    max_lora: int = 2  # the most adapters one request may name

    @property
    def schedulers(self) -> list[str]:
        """The sampler names a request may ask for (``pipelines.schedulers``)."""
        return names_for(self.kind == CLASS_CONDITIONAL, self.scheduler)

    @property
    def offered(self) -> Capabilities:
        """What the code runs for the folder's pipeline and sampler (pipelines.capabilities):
        ``GET /v1/models`` promises exactly this."""
        return capabilities(self.pipeline, self.scheduler)

    @property
    def edits(self) -> bool:
        """Image-to-image: an input image noised to a strength and denoised."""
        return self.offered.edits

    @property
    def inpainting(self) -> bool:
        return self.offered.inpainting

    @property
    def previews(self) -> bool:
        return self.offered.previews

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


# --- the file, as pydantic reads it: types, ranges and unknown keys; an error names its entry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _VariantEntry(_Strict):
    dtype: Literal["fp32", "fp16", "bf16"] | None = None
    artifact: str | None = None
    require_worker: bool | None = None  # None: the model's
    compile: bool | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> _VariantEntry:
        if self.artifact is not None and self.dtype is not None:
            raise ValueError("a variant is an artifact (its manifest says its dtype) or a dtype")
        return self


class _AdapterEntry(_Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scale: float = Field(1.0, ge=-LORA_SCALE_LIMIT, le=LORA_SCALE_LIMIT)

    @field_validator("scale", mode="before")
    @classmethod
    def _number(cls, value):  # TOML's 1 and 1.0 are both a scale
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _ModelEntry(_Strict):
    source: str
    kind: Literal["class-conditional", "text-to-image"] | None = None  # None: the folder's
    device: str = "cpu"
    default_steps: int | None = Field(None, ge=1)
    max_steps: int = Field(100, ge=1)
    guidance: float | None = None
    guidance_range: tuple[float, float] = (1.0, 20.0)
    sizes: list[str] | None = Field(None, min_length=1)
    default_variant: str | None = None
    shadow_prompt: str | None = None
    require_worker: bool = False
    compile: bool = False
    variants: dict[str, _VariantEntry] = Field(
        default_factory=lambda: {"fp32": _VariantEntry(dtype="fp32")}, min_length=1
    )
    adapters: dict[str, _AdapterEntry] = {}
    max_lora: int = Field(2, ge=1, le=8)

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value):
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                raise ValueError(f"adapter name {name!r}: letters, digits, _ . - (at most 64)")
        return value

    @field_validator("guidance_range", "guidance", mode="before")
    @classmethod
    def _numbers(cls, value):  # TOML's 20 and 20.0 are both a guidance
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, list):
            return tuple(
                float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value
            )
        return value

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value):
        for size in value or ():
            parse_size(size)
        return value


class _WorkerEntry(_Strict):
    device: str = "cpu"
    variants: list[str] | None = None  # None: every variant of its device
    memory_budget: int | str | None = None
    pin: list[str] = []

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, value):
        return None if value is None else parse_bytes(value)


class _RegistryFile(_Strict):
    models: dict[str, _ModelEntry] = Field(min_length=1)
    workers: dict[str, _WorkerEntry] = {}


def _problem(error: ErrorDetails) -> str:
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "not a key of this table"
    if error["type"] == "missing" and where in ("models",):
        return "no [models.NAME] entries"
    return f"{where}: {message}"


def load_registry(path: str | Path) -> Registry:
    """Parse and check the registry; an error names the entry at fault."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"cannot read the registry {path}: {exc}") from exc
    try:
        parsed = _RegistryFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise RegistryError(f"{path}: {problems}") from None
    models = {name: _model(name, entry, path.parent) for name, entry in parsed.models.items()}
    workers = {n: _worker(n, e, models) for n, e in parsed.workers.items()}
    return Registry(models, path, workers or _default_workers(models))


def _default_workers(models: dict[str, ModelSpec]) -> dict[str, WorkerSpec]:
    """Without [workers.NAME] tables: one worker per device, hosting every variant there."""
    by_device: dict[str, list[tuple[str, str]]] = {}
    for m, spec in models.items():
        by_device.setdefault(spec.device, []).extend((m, v) for v in spec.variants)
    return {d: WorkerSpec(d, d, tuple(targets)) for d, targets in by_device.items()}


def _worker(name: str, entry: _WorkerEntry, models: dict[str, ModelSpec]) -> WorkerSpec:
    where = f"workers.{name}"
    device = entry.device
    everything = [(m, v) for m, spec in models.items() for v in spec.variants]
    if entry.variants is not None:
        hosted = _matching(where, "variants", entry.variants, everything)
    else:  # every variant of the device
        hosted = [(m, v) for m, v in everything if models[m].device == device]
    for m, v in hosted:
        if models[m].device.split(":")[0] != device.split(":")[0]:
            raise RegistryError(f"{where}: {m}/{v} runs on {models[m].device}, not {device}")
    pinned = _matching(where, "pin", entry.pin, hosted)
    budget = None if entry.memory_budget is None else parse_bytes(entry.memory_budget)
    return WorkerSpec(name, device, tuple(hosted), budget, frozenset(pinned))


def _matching(
    where: str, key: str, patterns: list[str], among: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The (model, variant) pairs that "MODEL/VARIANT" patterns (shell wildcards) name, in
    registry order; a pattern that names nothing is an error."""
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


def _model(name: str, entry: _ModelEntry, base: Path) -> ModelSpec:
    """What the file says, completed from the model's folder (defaults.json, model_index,
    labels) and checked against it."""
    where = f"models.{name}"
    source = _resolve(entry.source, base)
    folder = Path(source) if Path(source).is_dir() else _cached(source)
    defaults = _read_json(folder / "defaults.json") if folder else {}
    index = _read_json(folder / "model_index.json") if folder else {}
    kind = entry.kind or defaults.get("kind")
    if kind is None:
        conditional = capabilities(index.get("_class_name"), None).class_conditional
        kind = CLASS_CONDITIONAL if conditional else TEXT_TO_IMAGE
    variants = {
        v: _variant(f"{where}.variants.{v}", v, e, base, entry) for v, e in entry.variants.items()
    }
    default_variant = entry.default_variant or next(iter(variants))
    if default_variant not in variants:
        raise RegistryError(f"{where}: default_variant {default_variant!r} is not a variant")
    height, width = defaults.get("height"), defaults.get("width")
    stated = str(Size(int(width), int(height))) if height and width else "512x512"
    sizes = tuple(entry.sizes or [stated])
    low, high = entry.guidance_range
    guidance = entry.guidance if entry.guidance is not None else defaults.get("guidance_scale", 5.0)
    spec = ModelSpec(
        name=name,
        source=source,
        kind=kind,
        variants=variants,
        default_variant=default_variant,
        device=entry.device,
        default_steps=entry.default_steps or int(defaults.get("num_inference_steps", 20)),
        max_steps=entry.max_steps,
        guidance=float(guidance),
        guidance_range=(low, high),
        sizes=sizes,
        labels=_labels(folder) if kind == CLASS_CONDITIONAL and folder else {},
        shadow_prompt=entry.shadow_prompt,
        scheduler=_scheduler(folder),
        pipeline=index.get("_class_name"),
        adapters={
            a: _adapter(f"{where}.adapters.{a}", a, e, base) for a, e in entry.adapters.items()
        },
        max_lora=entry.max_lora,
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


def _variant(
    where: str, name: str, entry: _VariantEntry, base: Path, model: _ModelEntry
) -> VariantSpec:
    require_worker = model.require_worker if entry.require_worker is None else entry.require_worker
    compile = model.compile if entry.compile is None else entry.compile
    if entry.artifact is not None:
        folder = Path(_resolve(entry.artifact, base))
        manifest_file = folder / "manifest.json"
        if not manifest_file.is_file():
            raise RegistryError(f"{where}: {folder} is not a quantized artifact (no manifest.json)")
        manifest = _read_json(manifest_file)
        dtype = manifest.get("dtype", "fp32")
        return VariantSpec(name, dtype, folder, require_worker, compile, manifest=manifest)
    return VariantSpec(name, entry.dtype or "fp32", None, require_worker, compile)


def _adapter(where: str, name: str, entry: _AdapterEntry, base: Path) -> AdapterSpec:
    """The entry, its file resolved; whether the file is what the sha256 pins and fits the
    model's layers is the worker's check at its start (it reads the tensors)."""
    file = Path(_resolve(entry.file, base))
    if not file.is_file():
        raise RegistryError(f"{where}: no adapter file {file}")
    return AdapterSpec(name, file, entry.sha256, entry.scale)


def _resolve(value: str, base: Path) -> str:
    """A path relative to the registry file when it exists there; otherwise as given (hub id)."""
    candidate = Path(value) if Path(value).is_absolute() else base / value
    return str(candidate.resolve()) if candidate.exists() else value


def _cached(hub_id: str) -> Path | None:
    """A hub id's snapshot in the local cache (its configs are read from there), else None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached, or not a hub id: its folder is not read
        return None


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
