"""Sensitivity analysis (docs/quantization.md, step 2): where quantization noise comes from.

All measurements replay the denoiser inputs recorded along the FP sampling trajectory, so FP and
quantized denoisers see the *same* inputs (x_t, t, condition) and their outputs are compared
with SQNR. Quantized variants are built by swapping a quantized *copy* of a block (or a layer)
into the FP denoiser and swapping the original back afterwards: the FP model is never altered
and a 28-block model needs no 28 full copies.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quality.metrics import sqnr_db
from quantization import backends
from quantization.capture import Call, channel_absmax, denoiser_output, detach, layer_stats, replay
from quantization.smoothing import ALPHAS, outlier_ratio, smoothing_scales, weight_channel_absmax
from quantization.types import LayerSpec

__all__ = [
    "Measurer",
    "Variant",
    "time_drift",
]

# A layer whose input range at some step is 2^0.4 = 1.32x larger or smaller than at the
# calibration step t = T. A whole octave missed most of the drifting layers of the small
# embedded DiT; at half an octave, single-step calibration of w4a8-sqnr on t2i-digits still
# lost 1.06 dB of latent SQNR to multi-step, at 0.4 it loses 0.30 (docs/quantization-results.md).
TIME_DRIFT_OCTAVES = 0.4
# Layers whose input channels are this uneven are tried with smoothing.
OUTLIER_RATIO = 4.0
# Smoothing is kept only where it buys at least this much SQNR at the layer's output.
SMOOTHING_MIN_GAIN_DB = 0.5


@dataclass(frozen=True)
class Variant:
    """A quantized variant measured against FP on the replayed trajectory."""

    sqnr_db: float  # at the denoiser output, all steps together
    sqnr_by_step: dict[int, float]  # at the denoiser output, per sampling step
    weight_bytes: int  # bytes of the quantized layers' tensors
    local_sqnr_db: float | None = None  # at the output of the block / layer itself


def time_drift(input_absmax_by_step: dict[int, float], calibration_step: int = 0) -> float:
    """max over steps of |log2(range at step / range at the calibration step)|, in octaves."""
    ref = input_absmax_by_step[calibration_step]
    if ref <= 0:
        return float("inf")
    drifts = [
        abs(torch.log2(torch.tensor(v / ref)).item())
        for v in input_absmax_by_step.values()
        if v > 0
    ]
    return max(drifts, default=0.0)


def _sqnr(reference: list[torch.Tensor], test: list[torch.Tensor]) -> float:
    return sqnr_db(
        torch.cat([t.flatten() for t in reference]), torch.cat([t.flatten() for t in test])
    )


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return denoiser_output(out)


class _Holder(nn.Module):
    """A block on its own, under the name "b", so layer names stay unique and a leaf works too."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.b = block

    def forward(self, *args, **kwargs):
        return _first_tensor(self.b(*args, **kwargs))


class Measurer:
    """The FP denoiser, the calibration calls and the trajectory to measure on.

    Args:
        denoiser: the FP denoiser (float32 or the dtype it will be quantized in); left intact.
        calibration: calls the quantized copies are calibrated on (single- or multi-step).
        trajectory: calls of full FP sampling runs, every step, that quality is measured on.
        backend: the backend the quantized copies are made with ("quanto" or "torchao").
        sampler: ``sampler(denoiser)`` samples the trajectory's conditions and seeds with that
            denoiser in the pipeline and returns the final latents; it makes end-to-end
            relative SQNR (``relative_end_to_end``) possible.
        fp_latents: what ``sampler`` gives with the FP denoiser, when already known (the
            recorded trajectory's); sampled once on first use otherwise.
        guide: measure on what the sampler uses of each output rather than the raw output:
            ``pipelines.generate.guided_prediction`` compares the guided noise, in which
            classifier-free guidance scales the difference of the two branches' errors by g.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        calibration: list[Call],
        trajectory: list[Call],
        backend: str = "quanto",
        sampler=None,
        fp_latents: torch.Tensor | None = None,
        guide=None,
    ) -> None:
        self.backend = backends.get(backend)
        self.guide = guide
        self.sampler = sampler
        self._fp_latents = fp_latents
        self.denoiser = denoiser.eval()
        self.calibration = calibration
        self.trajectory = trajectory
        self.steps = [c.step for c in trajectory]
        self.fp_outputs = self._replay(denoiser)
        self._fp_local: dict[str, list[torch.Tensor]] = {}
        self._inputs: dict[str, tuple[list[Call], list[Call]]] = {}

    # --- building blocks -------------------------------------------------------------------

    def _replay(self, model: nn.Module) -> list[torch.Tensor]:
        """The denoiser outputs on the trajectory, guided if so measured."""
        outputs = replay(model, self.trajectory)
        return outputs if self.guide is None else [self.guide(o) for o in outputs]

    @contextmanager
    def swapped(
        self,
        names: list[str],
        specs: dict[str, LayerSpec],
        smoothing: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[nn.Module]:
        """Inside, the modules ``names`` of the denoiser are quantized copies; originals after."""
        originals = {n: self.denoiser.get_submodule(n) for n in names}
        try:
            for n, m in originals.items():
                self.denoiser.set_submodule(n, copy.deepcopy(m))
            self.backend.quantize_layers(self.denoiser, specs, self.calibration, smoothing)
            yield self.denoiser
        finally:
            for n, m in originals.items():
                self.denoiser.set_submodule(n, m)

    @torch.no_grad()
    def _run(
        self, model: nn.Module, local: str | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Replay the trajectory: denoiser outputs, and the outputs of module ``local``."""
        local_outs: list[torch.Tensor] = []
        handle = None
        if local is not None:
            handle = model.get_submodule(local).register_forward_hook(
                lambda m, a, o: local_outs.append(self.backend.plain(_first_tensor(o)))
            )
        try:
            outputs = self._replay(model)
        finally:
            if handle is not None:
                handle.remove()
        return outputs, local_outs

    def _fp_local_outputs(self, name: str) -> list[torch.Tensor]:
        """Outputs of module ``name`` in the FP denoiser (call it while nothing is swapped in)."""
        if name not in self._fp_local:
            self._fp_local[name] = self._run(self.denoiser, name)[1]
        return self._fp_local[name]

    def measure(
        self, model: nn.Module, local: str | None = None, layers: list[str] | None = None
    ) -> Variant:
        """SQNR of ``model`` (denoiser with quantized parts) against FP, overall and per step."""
        fp_local = self._fp_local_outputs(local) if local is not None else None
        outputs, q_local = self._run(model, local)
        return Variant(
            sqnr_db=_sqnr(self.fp_outputs, outputs),
            sqnr_by_step=self._by_step(outputs),
            weight_bytes=self.layer_bytes(model, layers or []),
            local_sqnr_db=None if fp_local is None else _sqnr(fp_local, q_local),
        )

    def _by_step(self, outputs: list[torch.Tensor]) -> dict[int, float]:
        ref, test = defaultdict(list), defaultdict(list)
        for step, fp, q in zip(self.steps, self.fp_outputs, outputs, strict=True):
            ref[step].append(fp.flatten())
            test[step].append(q.flatten())
        return {s: sqnr_db(torch.cat(ref[s]), torch.cat(test[s])) for s in sorted(ref)}

    def layer_bytes(self, model: nn.Module, layers: list[str]) -> int:
        """Bytes the named layers' tensors take (quantized data, scales, biases)."""
        return sum(self.backend.nbytes(model.get_submodule(name)) for name in layers)

    # --- the analyses ------------------------------------------------------------------------

    def relative(self, block: str, specs: dict[str, LayerSpec], smoothing=None) -> Variant:
        """Only ``block`` quantized: the noise it adds by itself, at its output and the model's."""
        self._fp_local_outputs(block)  # before the swap: afterwards the block is the quantized one
        with self.swapped([block], specs, smoothing) as model:
            return self.measure(model, local=block, layers=list(specs))

    def relative_end_to_end(
        self, block: str, specs: dict[str, LayerSpec], smoothing=None
    ) -> Variant:
        """Only ``block`` quantized, the pipeline sampled from the trajectory's seeds: SQNR of
        the final latents against FP. The noise a block adds *as the sampler compounds it*
        over the steps, for one sampling run per measurement (as many denoiser calls as a
        replay of the trajectory)."""
        if self.sampler is None:
            raise ValueError("end-to-end relative SQNR needs a sampler")
        if self._fp_latents is None:
            self._fp_latents = self.sampler(self.denoiser)
        with self.swapped([block], specs, smoothing) as model:
            latents = self.sampler(model)
            weight_bytes = self.layer_bytes(model, list(specs))
        return Variant(sqnr_db(self._fp_latents, latents), {}, weight_bytes)

    def relative_alone(self, block: str, specs: dict[str, LayerSpec], smoothing=None) -> Variant:
        """Only ``block`` quantized and run by itself on its recorded inputs: SQNR at its output.

        The fast proxy for large models: one block's forward per call instead of the whole
        denoiser's. ``sqnr_db`` is then the block-output SQNR; ``sqnr_by_step`` likewise.
        """
        calib_in, traj_in = self._block_inputs(block)
        reference = self._fp_block_outputs(block, traj_in)
        prefix = f"{block}."
        holder = _Holder(copy.deepcopy(self.denoiser.get_submodule(block)))
        rel = {
            ("b" if n == block else "b." + n.removeprefix(prefix)): spec
            for n, spec in specs.items()
        }
        rel_smoothing = {
            ("b" if n == block else "b." + n.removeprefix(prefix)): v
            for n, v in (smoothing or {}).items()
        }
        self.backend.quantize_layers(holder, rel, calib_in, rel_smoothing)
        outputs = [self.backend.plain(o) for o in replay(holder, traj_in)]
        by_step = defaultdict(lambda: ([], []))
        for call, ref, out in zip(traj_in, reference, outputs, strict=True):
            by_step[call.step][0].append(ref)
            by_step[call.step][1].append(out)
        return Variant(
            sqnr_db=_sqnr(reference, outputs),
            sqnr_by_step={k: _sqnr(*v) for k, v in sorted(by_step.items())},
            weight_bytes=self.layer_bytes(holder, list(rel)),
            local_sqnr_db=_sqnr(reference, outputs),
        )

    @torch.no_grad()
    def _block_inputs(self, block: str) -> tuple[list[Call], list[Call]]:
        if block not in self._inputs:
            module = self.denoiser.get_submodule(block)
            recorded = []
            for calls in (self.calibration, self.trajectory):
                kept = []
                current = [0]
                handle = module.register_forward_pre_hook(
                    lambda m, a, kw, kept=kept, current=current: kept.append(
                        Call(current[0], detach(a), detach(kw))
                    ),
                    with_kwargs=True,
                )
                try:
                    for call in calls:
                        current[0] = call.step
                        self.denoiser(*call.args, **call.kwargs)
                finally:
                    handle.remove()
                recorded.append(kept)
            self._inputs[block] = tuple(recorded)
        return self._inputs[block]

    @torch.no_grad()
    def _fp_block_outputs(self, block: str, calls: list[Call]) -> list[torch.Tensor]:
        key = f"alone:{block}"
        if key not in self._fp_local:
            module = self.denoiser.get_submodule(block)
            self._fp_local[key] = [
                _first_tensor(module(*c.args, **c.kwargs)).detach().clone() for c in calls
            ]
        return self._fp_local[key]

    def layer_alone(self, layer: str, spec: LayerSpec, smoothing=None) -> Variant:
        """Only ``layer`` quantized: its SQNR at its own output and at the denoiser output."""
        self._fp_local_outputs(layer)  # before the swap: afterwards the layer is the quantized one
        with self.swapped([layer], {layer: spec}, smoothing) as model:
            return self.measure(model, local=layer, layers=[layer])

    def accumulated(
        self, blocks: list[str], specs_by_block: dict[str, dict[str, LayerSpec]], smoothing=None
    ) -> dict[str, float]:
        """Blocks 0..b quantized, for each b: how the noise builds up through the network."""
        result = {}
        originals = {b: self.denoiser.get_submodule(b) for b in blocks}
        try:
            for b in blocks:
                self.denoiser.set_submodule(b, copy.deepcopy(originals[b]))
                self.backend.quantize_layers(
                    self.denoiser, specs_by_block[b], self.calibration, smoothing
                )
                result[b] = _sqnr(self.fp_outputs, self._replay(self.denoiser))
        finally:
            for b, m in originals.items():
                self.denoiser.set_submodule(b, m)
        return result

    def full(self, specs: dict[str, LayerSpec], smoothing=None) -> tuple[nn.Module, Variant]:
        """A quantized copy of the whole denoiser, and how it measures."""
        model = copy.deepcopy(self.denoiser)
        self.backend.quantize_layers(model, specs, self.calibration, smoothing)
        return model, self.measure(model, layers=list(specs))

    # --- statistics that choose the local treatments ----------------------------------------

    def time_drifts(self, layers: list[str]) -> dict[str, float]:
        """Per layer, how far its input range moves over the trajectory from step 0, in octaves."""
        stats = layer_stats(self.denoiser, layers, self.trajectory)
        return {n: time_drift(stats.input_absmax_by_step[n]) for n in layers}

    @torch.no_grad()
    def choose_smoothing(self, layers: list[str], spec_of: dict[str, LayerSpec]) -> dict[str, dict]:
        """For uneven-input layers, the alpha that best raises their own SQNR (if any helps).

        Each candidate is tried on its own: its inputs from the calibration calls are captured
        once, then a quantized copy of the layer alone runs on them per alpha.
        """
        active = [n for n in layers if spec_of[n].activations is not None]
        inputs = self._layer_inputs(active)
        chosen = {}
        for name in active:
            x = inputs[name]
            act = _channel_absmax(x)
            ratio = outlier_ratio(act)
            if ratio < OUTLIER_RATIO:
                continue
            layer = self.denoiser.get_submodule(name)
            reference = [layer(t) for t in x]
            w = weight_channel_absmax(layer.weight)
            base = _alone_sqnr(self.backend, layer, spec_of[name], x, reference, None)
            best = (base, None, None)
            for alpha in ALPHAS:
                scale = smoothing_scales(act, w, alpha)
                db = _alone_sqnr(self.backend, layer, spec_of[name], x, reference, scale)
                if db > best[0]:
                    best = (db, alpha, scale)
            if best[1] is not None and best[0] - base >= SMOOTHING_MIN_GAIN_DB:
                chosen[name] = {
                    "alpha": best[1],
                    "scale": best[2],
                    "outlier_ratio": ratio,
                    "sqnr_db_before": base,
                    "sqnr_db_after": best[0],
                }
        return chosen

    @torch.no_grad()
    def _layer_inputs(self, layers: list[str]) -> dict[str, list[torch.Tensor]]:
        """The inputs each layer sees while the FP denoiser replays the calibration calls."""
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        handles = [
            self.denoiser.get_submodule(n).register_forward_pre_hook(
                lambda m, a, n=n: inputs[n].append(a[0].detach().clone())
            )
            for n in layers
        ]
        try:
            replay(self.denoiser, self.calibration)
        finally:
            for h in handles:
                h.remove()
        return inputs


def _channel_absmax(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([channel_absmax(x) for x in xs]).amax(0)


def _alone_sqnr(
    backend, layer: nn.Module, spec: LayerSpec, xs: list[torch.Tensor], reference, scale
) -> float:
    """A quantized copy of one layer, calibrated and run on its captured inputs, against FP."""
    holder = nn.Sequential(copy.deepcopy(layer))
    calls = [Call(i, (x,), {}) for i, x in enumerate(xs)]
    backend.quantize_layers(holder, {"0": spec}, calls, None if scale is None else {"0": scale})
    return _sqnr(reference, [backend.plain(holder(x)) for x in xs])
