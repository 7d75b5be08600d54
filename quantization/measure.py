"""Sensitivity measurements (docs/quantization.md, step 2), from the recorded FP trajectory.

A quantized copy of a unit (a block, or one module inside it) is swapped into the FP denoiser
and measured against FP on the recording (``quantization.recording``); the original is swapped
back, so the FP model is never altered and a 28-block model needs no 28 full copies:

- scope "block": the unit's block alone on its recorded inputs, SQNR at the block's output;
- scope "denoiser": the blocks that run before the unit's block return their recorded outputs,
  the rest runs; SQNR at the denoiser's output (the guided noise, where the sampler guides);
- end to end: the pipeline samples the measuring conditions with the copy in place; SQNR of
  the final latents. The costliest: used to check a plan and to refine the few units a check
  blames, never for every unit.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quality.metrics import sqnr_db
from quantization.activations import ActivationStats, InputRange, ranges_for
from quantization.backends import Backend
from quantization.capture import Call, replay
from quantization.recording import Recording
from quantization.smoothing import ALPHAS, outlier_ratio, smoothing_scales, weight_channel_absmax
from quantization.table import Unit
from quantization.types import LayerSpec

__all__ = ["SCOPES", "Measured", "Measurer", "time_drift"]

SCOPES = ("block", "denoiser")
# A layer whose input range at some step is 2^0.4 = 1.32x larger or smaller than at the
# calibration step t = T (docs/quantization-results.md).
TIME_DRIFT_OCTAVES = 0.4
OUTLIER_RATIO = 4.0  # layers whose input channels are this uneven are tried with smoothing
SMOOTHING_MIN_GAIN_DB = 0.5  # smoothing is kept only where it buys this much at the layer
SMOOTHING_ROWS = 512  # rows of a linear's input kept to choose its smoothing on


@dataclass(frozen=True)
class Measured:
    """A quantized variant against FP on the recording: overall, per recorded step, bytes."""

    sqnr_db: float
    weight_bytes: int
    by_step: dict[int, float]


class _Noise:
    """Running signal and noise powers, overall and per step."""

    def __init__(self) -> None:
        self.signal: dict[int, float] = defaultdict(float)
        self.noise: dict[int, float] = defaultdict(float)

    def add(self, step: int, reference: torch.Tensor, test: torch.Tensor) -> None:
        r, t = reference.detach().double(), test.detach().double()
        self.signal[step] += float((r * r).sum())
        self.noise[step] += float(((r - t) ** 2).sum())

    @staticmethod
    def _db(signal: float, noise: float) -> float:
        if noise == 0:
            return float("inf")
        if signal == 0:
            return float("-inf")
        return 10.0 * float(torch.log10(torch.tensor(signal / noise)))

    def overall(self) -> float:
        return self._db(sum(self.signal.values()), sum(self.noise.values()))

    def by_step(self) -> dict[int, float]:
        return {s: self._db(self.signal[s], self.noise[s]) for s in sorted(self.signal)}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.dequantize() if hasattr(value, "_data") else value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if hasattr(value, "to_tuple"):
        return _tensors(value.to_tuple())
    return []


def time_drift(input_absmax_by_step: dict[int, float], calibration_step: int = 0) -> float:
    """max over steps of |log2(range at step / range at the calibration step)|, in octaves."""
    ref = input_absmax_by_step[calibration_step]
    if ref <= 0:
        return float("inf")
    drifts = [
        abs(float(torch.log2(torch.tensor(v / ref))))
        for v in input_absmax_by_step.values()
        if v > 0
    ]
    return max(drifts, default=0.0)


def _weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(layer).__name__} has no weight tensor")
    return weight


def _drop_range_hook(model: nn.Module) -> None:
    """Once quantized copies are swapped out, no hook may switch scales of layers gone."""
    hook = getattr(model, "_t2i_range_hook", None)
    if hook is not None:
        hook.remove()
        object.__delattr__(model, "_t2i_range_hook")
        object.__setattr__(model, "_t2i_ranged", [])


class Measurer:
    """The FP denoiser, its recording, and what quantized copies are calibrated with.

    Args:
        denoiser: the FP denoiser (in the dtype it is quantized in); left as it was.
        recording: the FP trajectory of the measuring conditions (``record_trajectory``).
        backend: what makes the quantized copies.
        calibration: the calibration calls' activation ranges (static activations need them).
        calibration_calls: those calls, kept to choose smoothing on the layers' own inputs.
        guide: applied to every denoiser output at scope "denoiser" (the guided noise).
        sampler: ``sampler(denoiser) -> final latents`` on the recording's conditions and
            seeds, for end-to-end measurements.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        recording: Recording,
        backend: Backend,
        *,
        calibration: ActivationStats | None = None,
        calibration_calls: list[Call] | None = None,
        guide: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sampler: Callable[[nn.Module], torch.Tensor] | None = None,
    ) -> None:
        self.denoiser = denoiser.eval()
        self.recording = recording
        self.backend = backend
        self.calibration = calibration
        self.calibration_calls = calibration_calls or []
        self.guide = guide
        self.sampler = sampler
        self._feed: dict[str, Iterator[Any]] = {}
        self._fp_guided = [self._guided(o) for o in recording.outputs]

    def _guided(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.guide is None else self.guide(out)

    # --- quantized copies --------------------------------------------------------------------

    def ranges(
        self, specs: Mapping[str, LayerSpec], smoothing: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, InputRange]:
        """The calibrated input ranges the static layers of ``specs`` need."""
        return ranges_for(self.calibration, specs, smoothing)

    def quantize(
        self,
        model: nn.Module,
        specs: dict[str, LayerSpec],
        smoothing: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, LayerSpec]:
        """Quantize ``specs`` of ``model`` in place with the calibrated ranges."""
        smoothing = {n: s for n, s in (smoothing or {}).items() if n in specs}
        return self.backend.quantize_layers(model, specs, self.ranges(specs, smoothing), smoothing)

    def quantized_copy(
        self, specs: dict[str, LayerSpec], smoothing: Mapping[str, torch.Tensor] | None = None
    ) -> nn.Module:
        model = copy.deepcopy(self.denoiser).eval()
        self.quantize(model, specs, smoothing)
        return model

    @contextmanager
    def swapped(
        self,
        names: list[str],
        specs: dict[str, LayerSpec],
        smoothing: Mapping[str, torch.Tensor] | None = None,
    ) -> Iterator[nn.Module]:
        """Inside, the modules ``names`` of the denoiser are quantized copies; originals after."""
        originals = {n: self.denoiser.get_submodule(n) for n in names}
        try:
            for n, m in originals.items():
                self.denoiser.set_submodule(n, copy.deepcopy(m))
            self.quantize(self.denoiser, specs, smoothing)
            yield self.denoiser
        finally:
            for n, m in originals.items():
                self.denoiser.set_submodule(n, m)
            _drop_range_hook(self.denoiser)

    def layer_bytes(self, model: nn.Module, layers: list[str]) -> int:
        """Bytes the named layers' tensors take (quantized data, scales, biases)."""
        return sum(self.backend.nbytes(model.get_submodule(n)) for n in layers)

    # --- replaying the recording ------------------------------------------------------------

    @contextmanager
    def _replaying(self, blocks: list[str]) -> Iterator[None]:
        """Inside, ``blocks`` return their recorded outputs (of the call ``_feed`` is set for)."""
        for b in blocks:
            module = self.denoiser.get_submodule(b)
            module.forward = lambda *a, _b=b, **k: next(self._feed[_b])  # type: ignore[method-assign]
        try:
            yield
        finally:
            for b in blocks:
                del self.denoiser.get_submodule(b).forward

    @torch.no_grad()
    def _denoiser_scope(self, block: str) -> _Noise:
        rec, noise = self.recording, _Noise()
        before = rec.before(block)
        with self._replaying(before):
            for i, call in enumerate(rec.calls):
                self._feed = {b: iter(rec.block_outputs[b][i]) for b in before}
                out = self._guided(
                    self.backend.plain(_tensors(self.denoiser(*call.args, **call.kwargs))[0])
                )
                noise.add(call.step, self._fp_guided[i], out)
        self._feed = {}
        return noise

    @torch.no_grad()
    def _block_scope(self, block: str) -> _Noise:
        rec, noise = self.recording, _Noise()
        module = self.denoiser.get_submodule(block)
        for i, call in enumerate(rec.calls):
            for inputs, reference in zip(
                rec.block_inputs[block][i], rec.block_outputs[block][i], strict=True
            ):
                out = module(*inputs.args, **inputs.kwargs)
                for r, t in zip(_tensors(reference), _tensors(out), strict=True):
                    noise.add(call.step, r, t)
        return noise

    def unit(
        self,
        unit: Unit,
        block: str,
        specs: dict[str, LayerSpec],
        smoothing: Mapping[str, torch.Tensor] | None = None,
        scope: str = "denoiser",
    ) -> Measured:
        """Only ``unit`` (inside ``block``) quantized by ``specs``: its relative SQNR at
        ``scope``, from the recording."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        with self.swapped([unit.name], specs, smoothing) as model:
            noise = self._denoiser_scope(block) if scope == "denoiser" else self._block_scope(block)
            nbytes = self.layer_bytes(model, list(specs))
        return Measured(noise.overall(), nbytes, noise.by_step())

    @torch.no_grad()
    def replayed(self, model: nn.Module) -> Measured:
        """A whole quantized denoiser on the recorded calls: SQNR at its (guided) output."""
        noise = _Noise()
        for i, call in enumerate(self.recording.calls):
            out = self._guided(self.backend.plain(_tensors(model(*call.args, **call.kwargs))[0]))
            noise.add(call.step, self._fp_guided[i], out)
        nbytes = self.layer_bytes(model, list(self.backend.layer_specs(model)))
        return Measured(noise.overall(), nbytes, noise.by_step())

    # --- end to end ---------------------------------------------------------------------------

    def end_to_end(self, model: nn.Module) -> tuple[float, torch.Tensor]:
        """The pipeline samples the recording's conditions with ``model``: SQNR of the final
        latents against FP's, and those latents."""
        if self.sampler is None:
            raise ValueError("end-to-end measurements need a sampler")
        latents = self.sampler(model)
        return sqnr_db(self.recording.latents, latents), latents

    def unit_end_to_end(
        self,
        unit: Unit,
        specs: dict[str, LayerSpec],
        smoothing: Mapping[str, torch.Tensor] | None = None,
    ) -> float:
        """Only ``unit`` quantized, sampled end to end: SQNR of the final latents."""
        with self.swapped([unit.name], specs, smoothing) as model:
            return self.end_to_end(model)[0]

    # --- the detail pass ----------------------------------------------------------------------

    @torch.no_grad()
    def accumulated(
        self,
        blocks: list[str],
        specs_by_block: dict[str, dict[str, LayerSpec]],
        smoothing: Mapping[str, torch.Tensor] | None = None,
        progress: Callable[[], None] = lambda: None,
    ) -> dict[str, float]:
        """Blocks 0..b quantized, for each b: how the noise builds up (a replay per block)."""
        result = {}
        originals = {b: self.denoiser.get_submodule(b) for b in blocks}
        try:
            for b in blocks:
                self.denoiser.set_submodule(b, copy.deepcopy(originals[b]))
                self.quantize(self.denoiser, specs_by_block[b], smoothing)
                result[b] = self.replayed(self.denoiser).sqnr_db
                progress()
        finally:
            for b, m in originals.items():
                self.denoiser.set_submodule(b, m)
            _drop_range_hook(self.denoiser)
        return result

    @torch.no_grad()
    def layer(
        self,
        layer: str,
        block: str,
        spec: LayerSpec,
        smoothing: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[float, float]:
        """Only ``layer`` quantized, its block run on the recorded inputs: SQNR at the layer's
        own output and at the block's."""
        captured: list[torch.Tensor] = []

        def keep(module, args, out):
            captured.append(out.detach().clone())

        handle = self.denoiser.get_submodule(layer).register_forward_hook(keep)
        try:
            self._block_scope(block)
        finally:
            handle.remove()
        reference, captured = captured, []
        with self.swapped([layer], {layer: spec}, smoothing) as model:
            handle = model.get_submodule(layer).register_forward_hook(keep)
            try:
                at_block = self._block_scope(block).overall()
            finally:
                handle.remove()
        local = _Noise()
        for r, t in zip(reference, captured, strict=True):
            local.add(0, r, t)
        return local.overall(), at_block

    # --- statistics that choose the local treatments ----------------------------------------

    def time_drifts(self, layers: list[str]) -> dict[str, float]:
        """Per layer, how far its input range moves over the recorded steps from the first."""
        stats = self.recording.stats
        return {
            n: time_drift(stats.absmax_by_step(n), stats.steps[0])
            for n in layers
            if n in stats.channels
        }

    @torch.no_grad()
    def choose_smoothing(self, specs: dict[str, LayerSpec]) -> dict[str, dict]:
        """For layers with uneven input channels, the alpha that best raises their own SQNR
        (if any helps by ``SMOOTHING_MIN_GAIN_DB``), each tried alone on its calibration
        inputs."""
        if self.calibration is None:
            return {}
        candidates = [
            n
            for n, spec in specs.items()
            if spec.activations is not None
            and spec.granularity != "token"
            and outlier_ratio(self.calibration.channel_absmax(n)) >= OUTLIER_RATIO
        ]
        inputs = self._layer_inputs(candidates)
        chosen = {}
        for name in candidates:
            act = self.calibration.channel_absmax(name)
            layer = self.denoiser.get_submodule(name)
            xs = inputs[name]
            reference = [layer(x) for x in xs]
            w = weight_channel_absmax(_weight(layer))
            base = self._alone_sqnr(name, layer, specs[name], xs, reference, None)
            best: tuple[float, float | None, torch.Tensor | None] = (base, None, None)
            for alpha in ALPHAS:
                scale = smoothing_scales(act, w, alpha)
                db = self._alone_sqnr(name, layer, specs[name], xs, reference, scale)
                if db > best[0]:
                    best = (db, alpha, scale)
            if best[1] is not None and best[0] - base >= SMOOTHING_MIN_GAIN_DB:
                chosen[name] = {
                    "alpha": best[1],
                    "scale": best[2],
                    "outlier_ratio": outlier_ratio(act),
                    "sqnr_db_before": base,
                    "sqnr_db_after": best[0],
                }
        return chosen

    def _alone_sqnr(self, name, layer, spec, xs, reference, scale) -> float:
        holder = nn.Sequential(copy.deepcopy(layer))
        assert self.calibration is not None
        r = self.calibration.input_range(name, scale)
        smoothing = None if scale is None else {"0": scale}
        self.backend.quantize_layers(holder, {"0": spec}, {"0": r}, smoothing)
        noise = _Noise()
        for ref, x in zip(reference, xs, strict=True):
            noise.add(0, ref, self.backend.plain(holder(x)))
        return noise.overall()

    @torch.no_grad()
    def _layer_inputs(self, layers: list[str]) -> dict[str, list[torch.Tensor]]:
        """Each layer's inputs on the calibration calls (a linear's: at most SMOOTHING_ROWS
        rows, strided; a conv's: the first sample)."""
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

        def keep(name):
            def hook(module, args):
                x = args[0].detach()
                if x.dim() == 4:
                    x = x[:1]
                else:
                    x = x.reshape(-1, x.shape[-1])
                    x = x[:: max(1, x.shape[0] // SMOOTHING_ROWS)][:SMOOTHING_ROWS]
                inputs[name].append(x.clone())

            return hook

        handles = [
            self.denoiser.get_submodule(n).register_forward_pre_hook(keep(n)) for n in layers
        ]
        try:
            if layers:
                replay(self.denoiser, self.calibration_calls)
        finally:
            for h in handles:
                h.remove()
        return inputs
