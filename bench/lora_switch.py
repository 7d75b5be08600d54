"""What switching LoRA adapters costs a compiled denoiser (``pipelines.lora``).

    python -m bench.lora_switch                # t2i-digits UNet, fp32, both target sets
    python -m bench.lora_switch --variant models/quantized/t2i-digits-w8a8 --out /tmp/w8a8.json

The denoiser is ``torch.compile``d twice: as it is (the plain call a request makes today),
and with a LoRA branch beside every target layer (``attach``: buffers padded to
``--max-rank``). Timed, each the median of its calls: the plain call; the attached one with
no adapter and with one (steady); ``set_adapters`` switching to a new random adapter, and
the first call after it. Graphs compiled are counted before and after the switches: a
switch that recompiled would show there and in the first call's time. Two target sets:
the attention projections (what most LoRAs train) and every Linear and Conv2d (LoCon-style).
Random adapters (rank ``--rank``, seeded): timing does not depend on what they learned.
Writes bench/results/lora-switch.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.record import save
from pipelines import lora

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = Path(__file__).resolve().parent.parent / "models" / "t2i-digits"


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


def inputs(unet: nn.Module, batch: int) -> dict:
    cfg: Any = unet.config
    g = torch.Generator().manual_seed(0)
    size = cfg.sample_size
    return {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.full((batch,), 500),
        "encoder_hidden_states": torch.randn(batch, 16, cfg.cross_attention_dim, generator=g),
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
    plain: Callable[..., Any], variant: str, which: str, batch: int, rank: int, max_rank: int,
    rounds: int, switches: int,
) -> dict:  # fmt: skip
    """Against ``plain`` (the compiled denoiser without branches): plain and attached calls
    alternate, round by round, so that a load on a shared machine weighs on both alike."""
    kwargs = inputs(load_unet(variant), batch)
    unet = load_unet(variant)
    names = layer_names(unet, which)
    lora.attach(unet, max_rank, names)
    compiled = torch.compile(unet)
    print(f"compiling it with {len(names)} LoRA branches (rank <= {max_rank}) ...", flush=True)
    t = Times()
    compile_attached_s = t.call("compile", lambda: compiled(**kwargs)) / 1000
    for _ in range(3):  # warm both
        plain(**kwargs), compiled(**kwargs)

    for _ in range(rounds):
        t.call("plain", lambda: plain(**kwargs))
        t.call("none", lambda: compiled(**kwargs))
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

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.lora_switch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--variant", default="fp32", help="fp32, or a quantized artifact folder")
    p.add_argument("--batch", type=int, default=2, help="batch of a call (2: one image, CFG)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-rank", type=int, default=16)
    p.add_argument(
        "--targets", nargs="+", choices=["attention", "all"], default=["attention", "all"]
    )
    p.add_argument("--rounds", type=int, default=30, help="plain / attached call pairs")
    p.add_argument("--switches", type=int, default=20)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "lora-switch.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    plain = torch.compile(load_unet(args.variant))
    print("compiling the plain denoiser (a minute or two on 2 cores) ...", flush=True)
    plain(**inputs(load_unet(args.variant), args.batch))
    results = []
    for which in args.targets:
        results.append(
            measure(plain, args.variant, which, args.batch, args.rank, args.max_rank,
                    args.rounds, args.switches)
        )  # fmt: skip
    command = " ".join(["python -m bench.lora_switch", *(argv or sys.argv[1:])])
    load = round(os.getloadavg()[0], 2)
    record = save(args.out, command, threads=args.threads, load_average_1min=load, results=results)
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
