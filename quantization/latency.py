"""What each layer costs in time at each level, on this device: the planner's price of a
promotion beside its bytes (docs/quantization.md, "A planner that knows speed").

Every quantizable layer is timed alone, eager, on a random input of the shape it sees in a
denoiser call (rows = batch x tokens for a Linear, N x C x H x W for a Conv2d): float as it
is, and each quantized level as the backend builds it. Layers of one shape at one level are
timed once, and timings are cached in a JSON file per device (the CPU's model name, the
threads, torch's version and the backend: ``device_key``), so a second analysis on the same
machine times nothing it has seen.

Eager timings are a proxy for the compiled graph a worker runs: on a DiT-XL/2 linear the two
agree within 10 % for float, static and per-token int8, and both say what matters to the
plan: int8 is ~4x faster than float on large layers, and *slower* on small ones (32 rows x
256: 0.10 ms int8 against 0.035 ms float), where a promotion to float buys speed too.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantization import backends
from quantization.activations import InputRange
from quantization.backends import Backend
from quantization.capture import Call, replay
from quantization.cost import TIMING_MIN_SECONDS, TIMING_REPEATS, TIMING_WARMUP
from quantization.types import LayerSpec

__all__ = ["CACHE_ENV", "Latencies", "LatencyCache", "device_key", "input_shapes"]

CACHE_ENV = "T2I_LATENCY_CACHE"  # the cache file; default ~/.cache/t2i/latency.json


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(backend: str, device: str = "cpu") -> str:
    """What a timing depends on besides the layer: the device, threads, torch, the backend and
    the kernels it picked for this CPU (its ``versions()["kernels"]``, where it says)."""
    where = _cpu_name() if device.startswith("cpu") else torch.cuda.get_device_name(device)
    key = f"{where} | {torch.get_num_threads()} threads | torch {torch.__version__} | {backend}"
    picked = backends.get(backend).versions().get("kernels")
    return key if picked is None else f"{key} ({picked})"


def default_cache_path() -> Path:
    given = os.environ.get(CACHE_ENV)
    return Path(given) if given else Path.home() / ".cache" / "t2i" / "latency.json"


@dataclass
class LatencyCache:
    """Timings (ms) by device key, then by layer shape and level; a JSON file."""

    path: Path | None
    entries: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | None = None) -> LatencyCache:
        path = default_cache_path() if path is None else Path(path)
        entries: dict[str, dict[str, float]] = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
                entries = {str(k): {str(s): float(v) for s, v in d.items()} for k, d in raw.items()}
            except (ValueError, AttributeError, TypeError):
                entries = {}  # a torn or foreign file: timed again, then overwritten
        return cls(path, entries)

    def get(self, device: str, key: str) -> float | None:
        return self.entries.get(device, {}).get(key)

    def put(self, device: str, key: str, ms: float) -> float:
        """Keep a timing (rounded to 0.1 µs); the value kept."""
        kept = self.entries.setdefault(device, {})[key] = round(ms, 4)
        return kept

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)


@torch.no_grad()
def input_shapes(
    denoiser: nn.Module, layers: list[str], call: Call, batch: int | None = None
) -> dict[str, tuple]:
    """Each layer's input shape in one denoiser call; with ``batch``, at that batch instead
    of the call's (every layer's leading dimension is the call's batch in diffusers models:
    a Linear's (B, tokens, C), a Conv2d's (B, C, H, W))."""
    shapes: dict[str, tuple] = {}

    def keep(name: str):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [denoiser.get_submodule(n).register_forward_pre_hook(keep(n)) for n in layers]
    try:
        replay(denoiser, [call])
    finally:
        for h in handles:
            h.remove()
    if batch is None:
        return shapes
    first = _batch_of(call)
    if first is None:
        return shapes
    return {n: _rebatched(s, first, batch) for n, s in shapes.items()}


def _batch_of(call: Call) -> int | None:
    x = call.args[0] if call.args else next(iter(call.kwargs.values()), None)
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else None


def _rebatched(shape: tuple, batch_was: int, batch: int) -> tuple:
    """A layer input's shape at another batch: its leading dimension when it is the batch,
    else (a Linear fed flattened rows) the rows scaled."""
    if not shape or shape[0] % batch_was:
        return shape
    return (shape[0] // batch_was * batch, *shape[1:])


def _layer_key(layer: nn.Module, shape: tuple) -> str:
    weight = layer.get_parameter("weight")
    w = tuple(weight.shape)
    bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, nn.Conv2d):
        geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
        return f"conv2d {w} in {shape} {geometry} bias={bias} {weight.dtype}"
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return f"linear {w} rows {rows} bias={bias} {weight.dtype}"


def _spec_key(spec: LayerSpec | None) -> str:
    if spec is None:
        return "float"
    return f"{spec.weights}/{spec.activations}/{spec.group_size}/{spec.granularity}"


def _time(fn: Callable[[], object]) -> float:
    for _ in range(TIMING_WARMUP):
        fn()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < TIMING_REPEATS or time.perf_counter() - began < TIMING_MIN_SECONDS:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class Latencies:
    """Per-layer timings of one denoiser on one backend, through the device's cache.

    Args:
        denoiser: the FP denoiser (copies of single layers are timed; it is never changed).
        shapes: each layer's input shape (``input_shapes``).
        backend: what builds the quantized layers.
        cache: where timings are kept across runs.
        device: where the denoiser runs.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        shapes: Mapping[str, tuple],
        backend: Backend,
        cache: LatencyCache,
        device: str = "cpu",
    ) -> None:
        self.denoiser = denoiser
        self.shapes = dict(shapes)
        self.backend = backend
        self.cache = cache
        self.device = device_key(backend.NAME, device)
        self.timed = 0  # timings measured by this object (the rest came from the cache)
        self.seconds = 0.0  # what they took (set by ``analysis.time_levels``)

    def key(self, name: str, spec: LayerSpec | None) -> str:
        layer = self.denoiser.get_submodule(name)
        return f"{_layer_key(layer, self.shapes[name])} | {_spec_key(spec)}"

    def missing(self, wanted: list[tuple[str, LayerSpec | None]]) -> int:
        """How many distinct timings the (layer, spec) pairs ``wanted`` still need."""
        keys = {self.key(n, s) for n, s in wanted}
        return sum(self.cache.get(self.device, k) is None for k in keys)

    def layer_ms(self, name: str, spec: LayerSpec | None) -> float:
        """One layer at one spec (None: float), from the cache or timed now."""
        key = self.key(name, spec)
        ms = self.cache.get(self.device, key)
        if ms is None:
            ms = self.cache.put(self.device, key, self._measure(name, spec))
            self.timed += 1
        return ms

    def unit_ms(self, layers: tuple[str, ...], specs: Mapping[str, LayerSpec | None]) -> float:
        """A unit's layers, each at its spec (a layer missing from ``specs``: float)."""
        return sum(self.layer_ms(n, specs.get(n)) for n in layers)

    @torch.no_grad()
    def _measure(self, name: str, spec: LayerSpec | None) -> float:
        layer = self.denoiser.get_submodule(name)
        weight = layer.get_parameter("weight")
        x = torch.randn(self.shapes[name], dtype=weight.dtype, device=weight.device)
        with _alone(layer, spec, x, self.backend) as timed:
            return _time(lambda: timed(x))


@contextmanager
def _alone(
    layer: nn.Module, spec: LayerSpec | None, x: torch.Tensor, backend: Backend
) -> Iterator[nn.Module]:
    """The layer as the level makes it: itself for float, else a quantized copy, its static
    range taken from ``x``."""
    if spec is None:
        yield layer
        return
    holder = nn.Sequential(copy.deepcopy(layer))
    ranges = {}
    if spec.activations is not None and spec.granularity != "token":
        lo, hi = x.min().float().reshape(1), x.max().float().reshape(1)
        ranges["0"] = InputRange(
            torch.maximum(-lo, hi), ndim=x.dim(), low=lo.clamp(max=0), high=hi.clamp(min=0)
        )
        if spec.granularity == "timestep":  # one range is enough to time it
            spec = LayerSpec(spec.weights, spec.activations, spec.group_size, "tensor")
    backend.quantize_layers(holder, {"0": spec}, ranges)
    yield holder
