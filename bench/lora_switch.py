"""What switching LoRA adapters costs a compiled denoiser (``pipelines.lora``).

    python -m bench.lora_switch                # t2i-digits UNet, fp32, both target sets
    python -m bench.lora_switch --variant models/quantized/t2i-digits-w8a8 --out /tmp/w8a8.json
    python -m bench.lora_switch --arch sd15     # SD 1.5's UNet at real size: ~30 min here

The denoiser is ``torch.compile``d twice: as it is (the plain call a request makes today),
and with a LoRA branch beside every target layer (``attach``: buffers padded to
``--max-rank``). Timed, each the median of its calls: the plain call; the attached one with
no adapter and with one (steady); ``set_adapters`` switching to a new random adapter, and
the first call after it. Graphs compiled are counted before and after the switches: a
switch that recompiled would show there and in the first call's time. Two target sets:
the attention projections (what most LoRAs train) and every Linear and Conv2d (LoCon-style).
Random adapters (rank ``--rank``, seeded): timing does not depend on what they learned.
Writes bench/results/lora-switch.json and .md.

``--arch sd15``: SD 1.5's UNet at real size (``bench.full_size.sd15_unet``: random weights,
its configuration, 64x64x4 latents, 77x768 text states), each stage's time and memory
printed as it runs. 1. What a worker does at its start: two random rank-16 adapters on the
attention projections (to_q, to_k, to_v, to_out.0 of attn1 and attn2), written as
diffusers/PEFT safetensors (fp16, as such files usually are), read (``lora.read``, sha256
pinned) and checked against the UNet built on the meta device from its config.json
(``app.worker.adapters._skeleton``). 2. ``attach`` as the worker does it (``max_lora`` 2:
rank 32), its buffers and the process's RSS around it. 3. ``set_adapters``: to one adapter,
to the other, to both, to none. 4. Eager denoiser calls at batch 2, alternating round by
round: plain (the branches taken out again), attached ungated with no adapter (what a
compiled variant runs), attached gated with no adapter (an eager worker), an adapter active.
5. The same on the UNet quantized (``--quantized``, default w8a8-static@x86): the branches
wrap the quantized layers. 6. ``torch.compile``d plain and attached (ungated), the switches
timed as above, when the time left in ``--budget-min`` allows: the fp32 UNet, or the
quantized one with ``--compile-variant quantized``. Writes
bench/results/lora-switch-sd15.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch._inductor.utils import fresh_cache

from bench.full_size import parse_variant, sd15_unet
from bench.record import save
from bench.shared_memory import memory
from pipelines import lora
from quantization.api import quantize_denoiser
from quantization.capture import Call
from quantization.types import get_recipe

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "t2i-digits"
OUT = {"t2i-digits": RESULTS / "lora-switch.json", "sd15": RESULTS / "lora-switch-sd15.json"}


def load_unet(variant: str) -> nn.Module:
    """The t2i-digits UNet in fp32, or the quantized denoiser of an artifact folder."""
    if variant == "fp32":
        from pipelines.loader import load_pipeline

        return load_pipeline(MODEL).unet.eval()
    from quantization.artifact import load_quantized_denoiser

    return load_quantized_denoiser(variant)[1].eval()


def random_adapter(unet: nn.Module, rank: int, seed: int) -> lora.Adapter:
    """An adapter of ``rank`` on every layer of an attached denoiser, shaped by its buffers."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in unet.named_modules():
        if not isinstance(m, lora.LoRALayer):
            continue
        down = torch.randn(rank, *m.lora_down.shape[1:], generator=g) * 0.01
        up = torch.randn(m.lora_up.shape[0], rank, *m.lora_up.shape[2:], generator=g) * 0.01
        layers[name] = lora.LayerLoRA(name, down, up, float(rank))
    return lora.Adapter(f"random-{seed}", "(random)", "", "peft", layers)


def inputs(unet: nn.Module, batch: int, tokens: int = 16) -> dict:
    cfg: Any = unet.config
    g = torch.Generator().manual_seed(0)
    size = cfg.sample_size
    return {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.full((batch,), 500),
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g),
    }


class Times:
    """Wall and CPU milliseconds of calls, by label. CPU time (this process, all threads)
    is what a loaded shared machine distorts least: waiting for a core is not counted."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)

    def call(self, label: str, fn) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.cpu[label].append((time.process_time() - cpu) * 1000)
        self.wall[label].append((time.perf_counter() - wall) * 1000)
        return self.wall[label][-1]


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def layer_names(unet: nn.Module, which: str) -> list[str]:
    """``attention``: the attention projections (to_q, to_k, to_v, to_out.0), what most
    LoRAs train; ``all``: every Linear and Conv2d (LoCon-style, the costliest branch set)."""
    names = lora.targets(unet)
    if which == "all":
        return names
    return [n for n in names if n.rsplit(".", 2)[-1] in ("to_q", "to_k", "to_v", "0")
            and (".attn1." in n or ".attn2." in n)]  # fmt: skip


@torch.no_grad()
def measure(
    plain: Callable[..., Any], build: Callable[[], nn.Module], kwargs: dict, variant: str,
    which: str, batch: int, rank: int, max_rank: int, rounds: int, switches: int,
    warm: int = 3, progress: bool = False,
) -> dict:  # fmt: skip
    """Against ``plain`` (the compiled denoiser without branches): plain and attached calls
    alternate, round by round, so that a load on a shared machine weighs on both alike.
    ``build`` makes the denoiser to attach and compile; ``kwargs`` are a call's inputs."""
    unet = build()
    names = layer_names(unet, which)
    lora.attach(unet, max_rank, names)
    compiled = torch.compile(unet)
    print(f"compiling it with {len(names)} LoRA branches (rank <= {max_rank}) ...", flush=True)
    t = Times()
    compile_attached_s = t.call("compile", lambda: compiled(**kwargs)) / 1000
    if progress:
        print(f"compiled and called in {compile_attached_s:.1f} s", flush=True)
    for _ in range(warm):  # warm both
        plain(**kwargs), compiled(**kwargs)

    for i in range(rounds):
        t.call("plain", lambda: plain(**kwargs))
        t.call("none", lambda: compiled(**kwargs))
        if progress:
            shown = ", ".join(f"{k} {t.wall[k][-1]:.1f}" for k in ("plain", "none"))
            print(f"round {i + 1}/{rounds}: {shown} ms", flush=True)
    graphs_before = graphs()
    for i in range(switches):
        adapter = random_adapter(unet, rank, seed=i)
        t.call("plain_around", lambda: plain(**kwargs))
        t.call("set", lambda a=adapter: lora.set_adapters(unet, [(a, 0.8)]))
        t.call("first", lambda: compiled(**kwargs))
        t.call("second", lambda: compiled(**kwargs))
        labels = ("plain_around", "set", "first", "second")
        shown = ", ".join(f"{k} {t.wall[k][-1]:.1f}" for k in labels)
        print(f"switch {i + 1}/{switches}: {shown} ms", flush=True)
    graphs_after = graphs()
    set_ms, first_ms, steady_ms = t.wall["set"], t.wall["first"], t.wall["second"]
    plain_around_ms = t.wall["plain_around"]
    return {
        "variant": variant,
        "targets": which,
        "batch": batch,
        "rank": rank,
        "max_rank": max_rank,
        "lora_layers": len(names),
        "lora_buffer_bytes": sum(
            b.numel() * b.element_size()
            for m in unet.modules()
            if isinstance(m, lora.LoRALayer)
            for b in m.buffers(recurse=False)
        ),
        "compile_attached_s": round(compile_attached_s, 2),
        "plain_ms": med(t.wall["plain"]),
        "attached_no_adapter_ms": med(t.wall["none"]),
        "set_adapters_ms": med(set_ms),
        "first_call_after_switch_ms": med(first_ms),
        "first_call_after_switch_max_ms": round(max(first_ms), 3),
        "second_call_after_switch_ms": med(steady_ms),
        "plain_ms_during_switches": med(plain_around_ms),
        # per switch, against the plain call just before it: the machine's load varies
        "switch_plus_first_call_vs_plain": med(
            [(a + b) / c for a, b, c in zip(set_ms, first_ms, plain_around_ms, strict=True)]
        ),
        "first_vs_second_call_after_switch": med(
            [a / b for a, b in zip(first_ms, steady_ms, strict=True)]
        ),
        "graphs_compiled_by_switches": graphs_after - graphs_before,
        "cpu_ms": {k: med(v) for k, v in t.cpu.items() if k != "compile"},
        "rounds": rounds,
        "switches": switches,
    }


def markdown(record: dict) -> str:
    results = record["results"]
    cols = [f"{r['targets']} ({r['lora_layers']} layers)" for r in results]
    rows = [
        ("plain compiled call", "plain_ms"),
        ("attached, no adapter", "attached_no_adapter_ms"),
        ("`set_adapters` (a new adapter)", "set_adapters_ms"),
        ("first call after the switch", "first_call_after_switch_ms"),
        ("second call after the switch", "second_call_after_switch_ms"),
        ("plain call, between the switches", "plain_ms_during_switches"),
        ("(switch + first call) / plain call, per switch", "switch_plus_first_call_vs_plain"),
        ("first / second call after a switch, per switch", "first_vs_second_call_after_switch"),
        ("slowest first call after a switch", "first_call_after_switch_max_ms"),
        ("graphs compiled by the switches", "graphs_compiled_by_switches"),
        ("CPU: plain compiled call", "cpu:plain"),
        ("CPU: attached, no adapter", "cpu:none"),
        ("CPU: `set_adapters`", "cpu:set"),
        ("CPU: first call after the switch", "cpu:first"),
        ("CPU: second call after the switch", "cpu:second"),
        ("compiling with the branches, s", "compile_attached_s"),
        ("LoRA buffers, MB", "lora_buffer_bytes"),
    ]
    r0 = results[0]

    def cell(r: dict, key: str) -> str:
        v = r["cpu_ms"][key[4:]] if key.startswith("cpu:") else r[key]
        return f"{v / 1e6:.2f}" if key == "lora_buffer_bytes" else f"{v:g}"

    lines = [
        f"# LoRA switch cost: t2i-digits UNet, {r0['variant']}",
        "",
        f"`{record['command']}`, {record['date']}, {record['machine']}, a shared machine "
        f"(1-minute load average {record['load_average_1min']} at the end), "
        f"{record['threads']} torch thread(s). One denoiser call "
        f"at batch {r0['batch']}, `torch.compile` (Inductor, no freezing); LoRA buffers padded "
        f"to rank {r0['max_rank']}, random adapters of rank {r0['rank']}. Times in ms, medians "
        f"of {r0['rounds']} alternating plain / attached calls and of {r0['switches']} "
        "switches; wall time, and CPU time of the process (all threads: what waiting for a "
        "core on a loaded machine does not inflate). Targets: `attention` = to_q, to_k, "
        "to_v, to_out.0 of every attention; "
        "`all` = every Linear and Conv2d.",
        "",
        "| | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        *(f"| {label} | " + " | ".join(cell(r, k) for r in results) + " |" for label, k in rows),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --arch sd15: SD 1.5's UNet at real size, eager (fp32 and quantized) and compiled


def rss() -> int:
    """This process's resident memory (VmRSS), bytes."""
    return memory()["rss"]


def mb(n: float) -> float:
    return round(n / 2**20, 2)


class Progress:
    """Lines that say how long the run has taken, its RSS and the machine's load."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.loads: dict[str, float] = {}  # 1-minute load average at the end of each stage

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        head = f"[{self.elapsed():7.1f} s | RSS {rss() / 2**30:5.2f} GiB | "
        print(f"{head}load {os.getloadavg()[0]:4.2f}] {text}", flush=True)

    def stage(self, name: str, estimate_s: float | None) -> None:
        guess = "" if estimate_s is None else f" (about {estimate_s:.0f} s)"
        self.say(f"== {name}{guess} ...")

    def done(self, name: str, text: str = "") -> None:
        self.loads[name] = round(os.getloadavg()[0], 2)
        self.say(f"== {name} done{': ' + text if text else ''}")


def keep(t: Times, label: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` timed under ``label``; its value."""
    out: list[Any] = []
    t.call(label, lambda: out.append(fn()))
    return out[0]


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def write_adapter(path: Path, unet: nn.Module, names: list[str], rank: int, seed: int) -> None:
    """A random adapter of ``rank`` on the Linear layers ``names``, as diffusers/PEFT files
    hold one: ``unet.<module>.lora_A.weight`` (rank x in), ``lora_B.weight`` (out x rank),
    fp16."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        m: Any = unet.get_submodule(name)
        a = torch.randn(rank, m.in_features, generator=g) * 0.01
        b = torch.randn(m.out_features, rank, generator=g) * 0.01
        tensors[f"unet.{name}.lora_A.weight"] = a.half()
        tensors[f"unet.{name}.lora_B.weight"] = b.half()
    save_file(tensors, str(path), metadata={"format": "pt"})


def worker_start(
    unet: nn.Module, folder: Path, names: list[str], rank: int, repeats: int
) -> tuple[dict, dict[str, lora.Adapter]]:
    """Stage 1: two adapter files written to ``folder`` beside the UNet's config.json, and
    what a worker does with them at its start (``app.worker.adapters.read_all``: read with
    the sha256 pinned, a meta-device skeleton built from the config, each adapter checked
    against it), timed whole and by part, ``repeats`` times each."""
    from app.registry import TEXT_TO_IMAGE, AdapterSpec, ModelSpec
    from app.worker.adapters import _skeleton, read_all

    cast(Any, unet).save_config(folder / "unet")  # unet/config.json, as a pipeline folder holds it
    specs = {}
    for i, name in enumerate(("a", "b")):
        path = folder / f"lora-{name}.safetensors"
        write_adapter(path, unet, names, rank, seed=i)
        specs[name] = AdapterSpec(name, path, hashlib.sha256(path.read_bytes()).hexdigest())
    spec = ModelSpec(
        "sd15", str(folder), TEXT_TO_IMAGE, {}, "fp32", adapters=specs, max_lora=len(specs)
    )
    t = Times()
    adapters: dict[str, lora.Adapter] = {}
    skeleton = None
    for _ in range(repeats):
        for name, s in specs.items():
            adapters[name] = keep(t, "read", partial(lora.read, s.file, s.name, s.sha256))
        skeleton = keep(t, "skeleton", partial(_skeleton, folder))
        for adapter in adapters.values():
            t.call("check", partial(lora.check, adapter, skeleton))
        keep(t, "read_all", lambda: read_all(spec, folder))
    assert skeleton is not None
    first = adapters["a"]
    record = {
        "adapters": len(specs),
        "adapter_layers": len(first.layers),
        "adapter_rank": first.max_rank,
        "adapter_file_bytes": specs["a"].file.stat().st_size,
        "adapter_tensor_dtype": "float16",
        "skeleton_parameters": sum(p.numel() for p in skeleton.parameters()),
        "skeleton_on": str(next(skeleton.parameters()).device),
        "repeats": repeats,
        # read: per adapter file (hashed, parsed, checked finite); check: per adapter
        "read_ms": med(t.wall["read"]),
        "read_first_ms": round(t.wall["read"][0], 3),
        "skeleton_ms": med(t.wall["skeleton"]),
        "skeleton_first_ms": round(t.wall["skeleton"][0], 3),
        "check_ms": med(t.wall["check"]),
        "check_first_ms": round(t.wall["check"][0], 3),
        "read_all_ms": med(t.wall["read_all"]),  # the worker's whole start, both adapters
        "read_all_ms_each": [round(x, 3) for x in t.wall["read_all"]],
        "cpu_ms": {k: med(v) for k, v in t.cpu.items()},
    }
    return record, adapters


def _set_wrapped(unet: nn.Module, layers: dict[str, lora.LoRALayer], wrapped: bool) -> None:
    """The branches put in place (``wrapped``) or taken out (``lora.detach``: the plain
    denoiser, its own layers back, nothing copied)."""
    if wrapped:
        for name, layer in layers.items():
            lora._swap(unet, name, layer)
    else:
        lora.detach(unet)


CALLS = ("plain", "ungated_none", "gated_none", "adapter")


@torch.no_grad()
def eager(
    unet: nn.Module, variant: str, adapters: dict[str, lora.Adapter], kwargs: dict,
    rounds: int, switches: int, prog: Progress, call_s: float | None,
    outlook: Callable[[float], str] | None = None,
) -> dict:  # fmt: skip
    """Stages 2-4 on one eager denoiser: attached as a worker attaches it (gated; room for
    ``max_lora`` 2), ``set_adapters`` switched, and the four calls of ``CALLS`` alternated
    round by round (the first of each round turning). The denoiser is left plain."""
    from app.worker.adapters import attach

    t = Times()
    prog.stage(f"{variant}: a plain call (warm-up, and the estimate)", call_s)
    plain_out = keep(t, "warm_plain", lambda: unet(**kwargs).sample)
    call_s = t.wall["warm_plain"][0] / 1000
    total = call_s * (1 + rounds * len(CALLS))
    prog.done(f"{variant} warm-up", f"{call_s:.1f} s; stages 2-4 take about {total:.0f} s")
    if outlook is not None:
        prog.say(outlook(call_s))

    prog.stage(f"{variant}: attach (max_lora 2)", None)
    gc.collect()
    rss_before = rss()
    max_rank = keep(t, "attach", lambda: attach(unet, adapters, max_lora=2, dtype=torch.float32))
    gc.collect()
    rss_after = rss()
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, lora.LoRALayer)}
    buffers = sum(
        b.numel() * b.element_size() for m in layers.values() for b in m.buffers(recurse=False)
    )
    wrapped = sorted({type(m.base).__name__ for m in layers.values()})
    text = f"{t.wall['attach'][0]:.1f} ms, {len(layers)} layers ({', '.join(wrapped)})"
    prog.done("attach", f"{text}, buffers {mb(buffers)} MB, RSS +{mb(rss_after - rss_before)} MB")

    # on a loaded machine each small op of a multi-threaded process may wait for a thread
    # that is off its core: attach and set_adapters (some 400-800 small ops) timed at one
    # thread too, the branches attached again
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lora.detach(unet)
    keep(t, "attach_1", lambda: attach(unet, adapters, max_lora=2, dtype=torch.float32))
    torch.set_num_threads(threads)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, lora.LoRALayer)}
    gc.collect()
    rss_attached = rss()

    prog.stage(f"{variant}: set_adapters x {4 * switches}, {threads} and 1 thread(s)", None)
    a, b = adapters["a"], adapters["b"]
    sets = {"one": [(a, 1.0)], "other": [(b, 1.0)], "two": [(a, 1.0), (b, 0.5)], "none": []}
    rss_set = 0
    for n, suffix in ((threads, ""), (1, "_1")):
        torch.set_num_threads(n)
        for _ in range(switches):
            for label, chosen in sets.items():
                t.call(f"set_{label}{suffix}", lambda c=chosen: lora.set_adapters(unet, c))
                rss_set = rss_set or rss()  # the buffers' pages written for the first time
    torch.set_num_threads(threads)
    shown = ", ".join(f"{k} {med(t.wall[f'set_{k}'])} / {med(t.wall[f'set_{k}_1'])}" for k in sets)
    prog.done("set_adapters", f"medians {shown} ms ({threads} / 1 thread)")

    def setup(label: str) -> None:
        _set_wrapped(unet, layers, label != "plain")
        if label != "plain":
            for m in layers.values():
                m.gated = label == "gated_none"
            lora.set_adapters(unet, [(a, 1.0)] if label == "adapter" else [])

    prog.stage(f"{variant}: a call with the adapter (warm-up)", call_s)
    setup("adapter")
    adapter_out = keep(t, "warm_adapter", lambda: unet(**kwargs).sample)
    prog.done(f"{variant} adapter warm-up", f"{t.wall['warm_adapter'][0] / 1000:.1f} s")

    prog.stage(f"{variant}: {rounds} rounds of {', '.join(CALLS)}", call_s * rounds * 4)
    diffs: dict[str, float] = {}
    for r in range(rounds):
        turn = r % len(CALLS)
        for label in CALLS[turn:] + CALLS[:turn]:
            setup(label)
            out = keep(t, label, lambda: unet(**kwargs).sample)
            ref = adapter_out if label == "adapter" else plain_out
            diffs[label] = max(diffs.get(label, 0.0), float((out - ref).abs().max()))
        shown = ", ".join(f"{k} {t.wall[k][-1] / 1000:.2f}" for k in CALLS)
        prog.say(f"round {r + 1}/{rounds}: {shown} s")
    setup("plain")
    prog.done(f"{variant} rounds")

    def ratio(label: str, times: dict[str, list[float]]) -> float:
        return med([x / p for x, p in zip(times[label], times["plain"], strict=True)])

    return {
        "variant": variant,
        "wrapped_layer_types": wrapped,
        "lora_layers": len(layers),
        "max_rank": max_rank,
        "gated": "as the worker attaches an eager denoiser (gated); toggled for the calls",
        "attach_ms": round(t.wall["attach"][0], 3),
        "attach_ms_1_thread": round(t.wall["attach_1"][0], 3),
        "lora_buffer_bytes": buffers,
        "rss_before_attach_bytes": rss_before,
        "rss_after_attach_bytes": rss_after,
        "rss_attach_delta_bytes": rss_after - rss_before,
        # the zeroed buffers take pages once written (calloc): after the first set_adapters
        "rss_after_first_set_adapters_bytes": rss_set,
        "rss_first_set_adapters_delta_bytes": rss_set - rss_attached,
        "set_adapters_ms": {k: med(t.wall[f"set_{k}"]) for k in sets},
        "set_adapters_cpu_ms": {k: med(t.cpu[f"set_{k}"]) for k in sets},
        "set_adapters_max_ms": {k: round(max(t.wall[f"set_{k}"]), 3) for k in sets},
        "set_adapters_ms_1_thread": {k: med(t.wall[f"set_{k}_1"]) for k in sets},
        "set_adapters_cpu_ms_1_thread": {k: med(t.cpu[f"set_{k}_1"]) for k in sets},
        "switches": switches,
        "warm_plain_call_ms": round(t.wall["warm_plain"][0], 1),
        "warm_adapter_call_ms": round(t.wall["warm_adapter"][0], 1),
        "call_ms": {k: med(t.wall[k]) for k in CALLS},
        "call_cpu_ms": {k: med(t.cpu[k]) for k in CALLS},
        "call_ms_each": {k: [round(x, 1) for x in t.wall[k]] for k in CALLS},
        # per round, against that round's plain call
        "vs_plain": {k: ratio(k, t.wall) for k in CALLS[1:]},
        "cpu_vs_plain": {k: ratio(k, t.cpu) for k in CALLS[1:]},
        "max_abs_diff_vs_reference": {k: diffs[k] for k in CALLS},  # adapter: vs its warm-up
        "rounds": rounds,
    }


def twin(model: nn.Module) -> nn.Module:
    """A second module tree over the same parameter and buffer tensors (no weight copied)."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


@torch.no_grad()  # compiled for inference, as a worker calls it (no recompile in measure)
def compiled_stage(
    unet: nn.Module,
    variant: str,
    kwargs: dict,
    args: argparse.Namespace,
    prog: Progress,
    call_s: float,
) -> dict:
    """Stage 6: the plain UNet (fp32 or quantized: ``variant``) compiled, then ``measure`` on
    an attached twin of it (ungated, as a compiled worker attaches), when the estimates fit
    the budget. ``call_s``: one eager call of this variant."""
    calls = 2 * args.compile_rounds + 3 * args.compile_switches  # no warm pair: the
    # compiling calls warm both
    left = prog.budget_s - prog.elapsed()
    if left < call_s * (calls + 2):
        return {"skipped": f"{left:.0f} s of the budget left, the calls alone take "
                f"{call_s * (calls + 2):.0f} s"}  # fmt: skip
    torch._dynamo.reset()
    graphs0 = graphs()
    plain = torch.compile(unet)
    prog.stage(f"compile: the plain UNet, {variant} (compile + first call)", None)
    t = Times()
    t.call("compile", lambda: plain(**kwargs))
    compile_plain_s = t.wall["compile"][0] / 1000
    graphs_plain = graphs() - graphs0
    prog.done("compile plain", f"{compile_plain_s:.1f} s, {graphs_plain} graph(s)")
    left = prog.budget_s - prog.elapsed()
    estimate = 1.5 * compile_plain_s + call_s * calls
    if estimate > left:
        return {
            "variant": variant,
            "compile_plain_s": round(compile_plain_s, 2),
            "graphs_plain": graphs_plain,
            "skipped": f"attached: about {estimate:.0f} s (1.5x the plain compile, and the "
            f"calls), {left:.0f} s of the budget left",
        }
    prog.stage(
        f"compile: attached (rank {args.max_rank}), {args.compile_rounds} rounds, "
        f"{args.compile_switches} switches",
        estimate,
    )
    result = measure(
        plain, lambda: twin(unet), kwargs, variant, "attention", args.batch, args.rank,
        args.max_rank, args.compile_rounds, args.compile_switches, warm=0, progress=True,
    )  # fmt: skip
    prog.done("compiled", f"attached compile {result['compile_attached_s']} s")
    return {
        "compile_plain_s": round(compile_plain_s, 2),
        "graphs_plain": graphs_plain,
        "graphs_total": graphs() - graphs0,
        "warm_pairs": 0,
        **result,
    }


def run_sd15(args: argparse.Namespace, command: str) -> None:
    """Stages 1-6 on SD 1.5's UNet; writes the JSON and its table."""
    prog = Progress(args.budget_min * 60)
    load_start = round(os.getloadavg()[0], 2)
    measured = ["pipelines/lora.py", "app/worker/adapters.py", "bench/lora_switch.py"]
    blobs = subprocess.run(  # the code measured as it was run (the working tree's files)
        ["git", "hash-object", *measured], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lora-switch-sd15-") as tmp:
        prog.stage(f"building the SD 1.5 UNet ({args.layers} layers per block, fp32)", 15)
        t = Times()
        fp = keep(t, "build", lambda: sd15_unet(torch.float32, "cpu", args.layers))
        params = sum(p.numel() for p in fp.parameters())
        prog.done("build", f"{params:,} parameters, {t.wall['build'][0] / 1000:.1f} s")
        names = layer_names(fp, "attention")
        kwargs = inputs(fp, args.batch, tokens=77)

        prog.stage("1. worker start: write, read, skeleton, check (x3)", 30)
        start, adapters = worker_start(fp, Path(tmp), names, args.rank, repeats=3)
        shown = ", ".join(f"{k} {start[k]}" for k in ("read_ms", "skeleton_ms", "check_ms"))
        prog.done("worker start", f"{shown}, read_all {start['read_all_ms']} ms")

        def outlook(call_s: float) -> str:
            eager_s = call_s * (2 + 4 * args.rounds)
            quantized_s = 0 if "quantized" in args.skip else 2 * call_s + 1.2 * eager_s
            calls = 2 * args.compile_rounds + 3 * args.compile_switches + 2
            compiled = "" if "compile" in args.skip else f", then the compile stage: {calls} "
            compiled += "" if "compile" in args.skip else "calls and two compiles (if they fit)"
            return (f"estimate: fp32 eager {eager_s:.0f} s, quantized {quantized_s:.0f} s "
                    f"(its calls taken as 1.2x fp32's){compiled}")  # fmt: skip

        results = [
            eager(fp, "fp32", adapters, kwargs, args.rounds, args.switches, prog, None, outlook)
        ]
        call_s = results[0]["call_ms"]["plain"] / 1000
        record_kw: dict[str, Any] = {}

        def write(complete: bool) -> dict:
            load = round(os.getloadavg()[0], 2)
            record = save(
                args.out, command, arch="sd15",
                model=f"SD 1.5 UNet (bench.full_size.sd15_unet, {args.layers} layers per "
                "block), random weights, fp32, 64x64x4 latents, 77x768 text states",
                parameters=params, batch=args.batch, threads=args.threads,
                torch=torch.__version__, git_head=head,
                git_blobs=dict(zip(measured, blobs, strict=False)),
                complete=complete, wall_s=round(prog.elapsed(), 1),
                peak_rss_bytes=memory()["hwm"], load_average_1min=load,
                load_average_1min_start=load_start, load_average_1min_by_stage=prog.loads,
                build_ms=round(t.wall["build"][0], 1), worker_start=start, eager=results,
                **record_kw,
            )  # fmt: skip
            args.out.with_suffix(".md").write_text(markdown_sd15(record))
            return record

        write(False)
        compile_on: tuple[nn.Module, str, float] = (fp, "fp32", call_s)
        if "quantized" in args.skip:
            record_kw["quantized_skipped"] = "--skip quantized"
        else:
            name, granularity, backend, _ = parse_variant(args.quantized)
            recipe = get_recipe(name).with_granularity(granularity)
            # calibrated on the timed call's inputs at the first step of a sampling
            calls = [Call(0, (), {**kwargs, "timestep": torch.full((args.batch,), 999)})]
            prog.stage(f"5. quantizing: {args.quantized} (calibration: 1 call)", 2.5 * call_s)
            q = keep(t, "quantize", lambda: quantize_denoiser(fp, recipe, calls, backend=backend))
            q = q.model
            gc.collect()
            prog.done("quantize", f"{t.wall['quantize'][0] / 1000:.1f} s")
            row = eager(q, args.quantized, adapters, kwargs, args.rounds, args.switches, prog,
                        call_s)  # fmt: skip
            row["quantize_s"] = round(t.wall["quantize"][0] / 1000, 1)
            results.append(row)
            if args.compile_variant == "quantized":
                compile_on = (q, args.quantized, row["call_ms"]["plain"] / 1000)
            del q
            gc.collect()
            write(False)
        if "compile" in args.skip:
            record_kw["compiled"] = {"skipped": "--skip compile"}
        else:
            # Inductor's caches empty (a cold compile, as a worker's first), in a temporary
            # directory removed afterwards
            with fresh_cache():
                compiled = compiled_stage(compile_on[0], compile_on[1], kwargs, args, prog,
                                          compile_on[2])  # fmt: skip
            compiled["inductor_cache"] = "fresh (torch._inductor.utils.fresh_cache)"
            record_kw["compiled"] = compiled
        record = write(True)
    print(markdown_sd15(record))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {prog.elapsed():.0f} s")


def markdown_sd15(record: dict) -> str:
    s, rows, threads = record["worker_start"], record["eager"], record["threads"]
    lines = [
        "# LoRA per request at real size: SD 1.5 UNet",
        "",
        f"`{record['command']}`, {record['date']}, {record['machine']}, a shared machine "
        f"(1-minute load average {record['load_average_1min_start']} at the start, "
        f"{record['load_average_1min']} at the end), {record['threads']} torch threads, "
        f"torch {record['torch']}. {record['model']}, {record['parameters']:,} parameters. "
        f"Whole run {record['wall_s']} s, peak RSS {mb(record['peak_rss_bytes'])} MB.",
        "",
        f"## Worker start (medians of {s['repeats']})",
        "",
        f"{s['adapters']} adapter files, rank {s['adapter_rank']} on {s['adapter_layers']} "
        f"attention projections, diffusers/PEFT keys, {s['adapter_tensor_dtype']}, "
        f"{s['adapter_file_bytes']:,} bytes each.",
        "",
        "| | ms | first, ms |",
        "|---|---:|---:|",
        f"| `lora.read` (one file, sha256 pinned) | {s['read_ms']} | {s['read_first_ms']} |",
        f"| meta skeleton from config.json | {s['skeleton_ms']} | {s['skeleton_first_ms']} |",
        f"| `lora.check` (one adapter, skeleton) | {s['check_ms']} | {s['check_first_ms']} |",
        f"| `read_all` (the worker's start, {s['adapters']} adapters) | {s['read_all_ms']} "
        f"| {s['read_all_ms_each'][0]} |",
        "",
        f"## Eager, batch {record['batch']} (medians of the rounds; ratios per round against "
        "its plain call)",
        "",
        "| | " + " | ".join(r["variant"] for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]

    def row(label: str, cells: list[Any]) -> str:
        return f"| {label} | " + " | ".join(str(c) for c in cells) + " |"

    lines += [
        row("wrapped layers", [f"{r['lora_layers']} x {'/'.join(r['wrapped_layer_types'])}"
                               for r in rows]),
        row(f"`attach`, ms ({threads} / 1 thread)",
            [f"{r['attach_ms']} / {r['attach_ms_1_thread']}" for r in rows]),
        row("LoRA buffers (rank 32), MB", [mb(r["lora_buffer_bytes"]) for r in rows]),
        row("RSS before -> after attach, MB", [f"{mb(r['rss_before_attach_bytes'])} -> "
            f"{mb(r['rss_after_attach_bytes'])} (+{mb(r['rss_attach_delta_bytes'])})"
            for r in rows]),
        row("RSS growth at the first `set_adapters`, MB",
            [f"+{mb(r['rss_first_set_adapters_delta_bytes'])}" for r in rows]),
        *(row(f"`set_adapters` to {k}, ms ({threads} / 1 thread)",
              [f"{r['set_adapters_ms'][k]} / {r['set_adapters_ms_1_thread'][k]}" for r in rows])
          for k in ("one", "other", "two", "none")),
        *(row(f"call: {k}, ms (CPU ms)", [f"{r['call_ms'][k]:,.1f} "
              f"({r['call_cpu_ms'][k]:,.1f})" for r in rows]) for k in CALLS),
        *(row(f"{k} / plain (CPU)", [f"{r['vs_plain'][k]} ({r['cpu_vs_plain'][k]})"
                                     for r in rows]) for k in CALLS[1:]),
        row("rounds", [r["rounds"] for r in rows]),
        row("quantizing, s", [r.get("quantize_s", "") for r in rows]),
        "",
        "plain: the branches taken out; ungated_none: attached, no adapter, branch computed "
        "(what a compiled worker runs); gated_none: attached, no adapter, branch skipped (an "
        "eager worker); adapter: one rank-16 adapter active.",
        "",
    ]  # fmt: skip
    c = record.get("compiled", {})
    lines += [f"## torch.compile ({c.get('variant', 'fp32')}, Inductor, no freezing)", ""]
    if "compile_plain_s" in c:
        lines.append(f"Plain UNet: compile + first call {c['compile_plain_s']} s, "
                     f"{c['graphs_plain']} graph(s).")  # fmt: skip
    if "skipped" in c:
        lines.append(f"Skipped: {c['skipped']}.")
    if "plain_ms" in c:
        lines += [
            "",
            "| | ms |",
            "|---|---:|",
            f"| attached: compile + first call, s | {c['compile_attached_s']} |",
            f"| plain compiled call | {c['plain_ms']} |",
            f"| attached, no adapter | {c['attached_no_adapter_ms']} |",
            f"| `set_adapters` (a new adapter) | {c['set_adapters_ms']} |",
            f"| first call after the switch | {c['first_call_after_switch_ms']} |",
            f"| second call after the switch | {c['second_call_after_switch_ms']} |",
            f"| plain call, between the switches | {c['plain_ms_during_switches']} |",
            f"| (switch + first call) / plain, per switch | "
            f"{c['switch_plus_first_call_vs_plain']} |",
            f"| first / second call after a switch | {c['first_vs_second_call_after_switch']} |",
            f"| graphs compiled by the switches | {c['graphs_compiled_by_switches']} |",
            f"| CPU: plain / attached no adapter / first after switch | {c['cpu_ms']['plain']} "
            f"/ {c['cpu_ms']['none']} / {c['cpu_ms']['first']} |",
            f"| rounds, switches | {c['rounds']}, {c['switches']} |",
        ]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.lora_switch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", choices=list(OUT), default="t2i-digits")
    p.add_argument(
        "--variant", default="fp32", help="t2i-digits: fp32, or a quantized artifact folder"
    )
    p.add_argument("--batch", type=int, default=2, help="batch of a call (2: one image, CFG)")
    p.add_argument("--rank", type=int, help="of the adapters (default: 8; sd15: 16)")
    p.add_argument(
        "--max-rank", type=int, help="of the buffers (default: 16; sd15: 32, max_lora 2)"
    )
    p.add_argument(
        "--targets", nargs="+", choices=["attention", "all"], default=["attention", "all"],
        help="t2i-digits (sd15: attention)",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int,
        help="plain / attached call pairs (default 30); sd15: eager rounds of the 4 calls (3)",
    )  # fmt: skip
    p.add_argument(
        "--switches", type=int,
        help="compiled switches timed (default 20); sd15: rounds of the 4 set_adapters (5)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int,
        help="torch threads (default 1: steadier on a shared machine; sd15: 2)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="default bench/results/lora-switch[-sd15].json")
    sd15 = p.add_argument_group("--arch sd15")
    sd15.add_argument("--layers", type=int, default=2, help="layers per UNet block (SD 1.5: 2)")
    sd15.add_argument(
        "--quantized", default="w8a8-static@x86", help="the quantized variant: recipe@backend"
    )
    sd15.add_argument(
        "--compile-rounds", type=int, default=2, help="compiled plain / attached call pairs"
    )
    sd15.add_argument(
        "--compile-switches", type=int, default=2, help="compiled switches (each 2 calls)"
    )
    sd15.add_argument(
        "--skip", nargs="+", choices=["quantized", "compile"], default=[], help="stages left out"
    )
    sd15.add_argument(
        "--compile-variant", choices=["fp32", "quantized"], default="fp32",
        help="the UNet the compile stage compiles, plain and with the branches",
    )  # fmt: skip
    sd15.add_argument(
        "--budget-min", type=float, default=30,
        help="the compile stage runs only when its estimate fits the minutes left",
    )  # fmt: skip
    args = p.parse_args(argv)
    sd = args.arch == "sd15"
    if args.compile_variant == "quantized" and {"quantized", "compile"} & set(args.skip):
        p.error("--compile-variant quantized needs the quantized and compile stages")
    defaults = {"rank": (8, 16), "max_rank": (16, 32), "rounds": (30, 3), "switches": (20, 5)}
    defaults["threads"] = (1, 2)
    for key, (t2i, big) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, big if sd else t2i)
    args.out = args.out or OUT[args.arch]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    command = " ".join(["python -m bench.lora_switch", *(sys.argv[1:] if argv is None else argv)])
    if sd:
        run_sd15(args, command)
        return
    plain = torch.compile(load_unet(args.variant))
    print("compiling the plain denoiser (a minute or two on 2 cores) ...", flush=True)
    kwargs = inputs(load_unet(args.variant), args.batch)
    plain(**kwargs)
    results = []
    for which in args.targets:
        results.append(
            measure(plain, lambda: load_unet(args.variant), kwargs, args.variant, which,
                    args.batch, args.rank, args.max_rank, args.rounds, args.switches)
        )  # fmt: skip
    load = round(os.getloadavg()[0], 2)
    record = save(args.out, command, threads=args.threads, load_average_1min=load, results=results)
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
