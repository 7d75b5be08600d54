"""The timings the plan of work is estimated from, taken on the device before any measuring:
one FP denoiser call at batch 2 split per block by hooks (a second at a larger batch when a
call is short enough that its fixed part matters), a quantized copy of the slowest block at
each level timed against FP, and one VAE decoding."""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from quantization.activations import collect_stats
from quantization.backends import Backend
from quantization.capture import Call, record_calls
from quantization.cost import Timings
from quantization.recording import tensor_nbytes
from quantization.types import LayerSpec

__all__ = ["call_seconds", "probe"]

SMALL_CALL_SECONDS = 0.5  # below this, a second call at a larger batch finds the fixed part
LARGE_BATCH = 64


def _repeat(value, times: int, batch: int):
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch:
            return value.repeat(times, *[1] * (value.dim() - 1))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, times, batch) for v in value)
    if isinstance(value, dict):
        return {k: _repeat(v, times, batch) for k, v in value.items()}
    return value


def _timed(fn: Callable[[], object], repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _write_rate(megabytes: int = 64) -> float:
    """Seconds per GB to write a file, sync it and read it back for its sha256 (an artifact's
    save), on the temporary folder's disk."""
    data = os.urandom(megabytes * 2**20)
    with tempfile.NamedTemporaryFile() as f:
        start = time.perf_counter()
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        hashlib.sha256(f.read()).hexdigest()
        seconds = time.perf_counter() - start
    return seconds / (megabytes * 2**20 / 1e9)


def _runner(module: nn.Module, call: Call) -> Callable[[], object]:
    return lambda: module(*call.args, **call.kwargs)


@torch.no_grad()
def call_seconds(denoiser: nn.Module, first_call: Callable[[], object]) -> float:
    """Seconds of one call of ``denoiser`` (e.g. a quantized copy) on the inputs that
    ``first_call()`` (a sampling, stopped at its first denoiser call) gives it."""
    call = record_calls(denoiser, first_call, steps={0})[0]
    return _timed(_runner(denoiser, call), repeats=1)


@torch.no_grad()
def probe(
    denoiser: nn.Module,
    first_call: Callable[[], object],
    blocks: list[str],
    backend: Backend,
    level_specs: dict[str, Callable[[str], LayerSpec | None]],
    decode: Callable[[torch.Tensor], object],
) -> tuple[Timings, Call]:
    """Timings of ``denoiser``; ``first_call()`` samples one condition (batch 2 with guidance)
    up to its first denoiser call, whose inputs are the probe's.

    ``level_specs[level](layer)``: the spec a layer gets at a measured level.
    """
    call = record_calls(denoiser, first_call, steps={0})[0]
    batch = (
        int(call.args[0].shape[0]) if call.args else int(next(iter(call.kwargs.values())).shape[0])
    )
    starts: dict[str, float] = {}
    spent: dict[str, float] = {b: 0.0 for b in blocks}
    captured: dict[str, Call] = {}
    kept: list[int] = [0]  # what a recording keeps of a call: every block's inputs, outputs
    seen: set[int] = set()

    def pre(name):
        def hook(module, args, kwargs):
            starts[name] = time.perf_counter()
            captured.setdefault(name, Call(0, args, kwargs))
            kept[0] += tensor_nbytes([args, kwargs], seen)

        return hook

    def post(name):
        def hook(module, args, kwargs, out):
            spent[name] += time.perf_counter() - starts[name]
            kept[0] += tensor_nbytes(out, seen)

        return hook

    denoiser(*call.args, **call.kwargs)  # warm-up
    handles = []
    for b in blocks:
        m = denoiser.get_submodule(b)
        handles.append(m.register_forward_pre_hook(pre(b), with_kwargs=True))
        handles.append(m.register_forward_hook(post(b), with_kwargs=True))
    start = time.perf_counter()
    try:
        denoiser(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    call_seconds = time.perf_counter() - start
    order = sorted(
        blocks, key=lambda b: list(captured).index(b) if b in captured else len(captured)
    )
    block_seconds = {b: spent[b] for b in order}

    fixed = 0.0
    small = call_seconds < SMALL_CALL_SECONDS and batch < LARGE_BATCH
    times = LARGE_BATCH // batch
    if small:
        big = Call(0, _repeat(call.args, times, batch), _repeat(call.kwargs, times, batch))
        large = _timed(lambda: denoiser(*big.args, **big.kwargs))
        per_sample = max((large - call_seconds) / (batch * (times - 1)), 0.0)
        fixed = max(call_seconds - per_sample * batch, 0.0)

    # the slowest block with its layers inside it: a block that is one layer (a UNet's
    # conv_in) cannot be quantized alone, the backends swapping the children of their model
    inner = [b for b in block_seconds if not isinstance(denoiser.get_submodule(b), backend.LAYERS)]
    slowest = max(inner or block_seconds, key=lambda b: block_seconds[b])
    module = denoiser.get_submodule(slowest)
    inputs = captured[slowest]
    large_inputs = Call(0, _repeat(inputs.args, times, batch), _repeat(inputs.kwargs, times, batch))
    fp_seconds = _timed(lambda: module(*inputs.args, **inputs.kwargs))
    fp_large = _timed(lambda: module(*large_inputs.args, **large_inputs.kwargs)) if small else 0.0
    factor_large: dict[str, float] = {}
    layers = [n for n, m in module.named_modules() if isinstance(m, backend.LAYERS)]
    stats = collect_stats(module, layers, [inputs])
    factor: dict[str, float] = {}
    copy_rate = []
    gb = sum(p.numel() * p.element_size() for p in module.parameters()) / 1e9
    for level, spec_of in level_specs.items():
        # a scale per timestep range runs the same kernels as one per tensor: timed as that
        # (the probe's one call has no ranges to calibrate)
        specs = {
            n: replace(s, granularity="tensor") if s.granularity == "timestep" else s
            for n in layers
            if (s := spec_of(f"{slowest}.{n}")) is not None
        }
        if not specs:
            factor[level] = factor_large[level] = 1.0
            continue
        ranges = {
            n: stats.input_range(n)
            for n, s in specs.items()
            if s.activations is not None and s.granularity != "token"
        }
        begin = time.perf_counter()
        q = copy.deepcopy(module)
        backend.quantize_layers(q, specs, ranges)
        copy_rate.append((time.perf_counter() - begin) / max(gb, 1e-9))
        factor[level] = _timed(_runner(q, inputs)) / max(fp_seconds, 1e-9)
        if small:
            factor_large[level] = _timed(_runner(q, large_inputs)) / max(fp_large, 1e-9)
    write_seconds_per_gb = _write_rate()
    x = call.args[0] if call.args else call.kwargs["hidden_states"]
    latent = x[:1, : x.shape[1]].float()
    decode_seconds = _timed(lambda: decode(latent), repeats=1)
    timings = Timings(
        batch=batch,
        call_seconds=call_seconds,
        fixed_seconds=fixed,
        block_seconds=block_seconds,
        factor=factor,
        decode_seconds=decode_seconds,
        copy_seconds_per_gb=max(copy_rate, default=1.0),
        write_seconds_per_gb=write_seconds_per_gb,
        record_bytes_per_call=kept[0],
        large_batch=batch * times if small else None,
        factor_large=factor_large if small else None,
    )
    return timings, call
