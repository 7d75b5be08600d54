"""Which matrix product is fast on this CPU? The kernels the CPU variants can run, timed on the
shapes of real models.

    python -m bench.cpu_gemm                 # every shape, 10 rounds
    python -m bench.cpu_gemm --rounds 20 --shapes dit-xl-2.fc1

One Linear layer's product, (rows x in) by (out x in), at the shapes of DiT-XL/2's and SD 1.5's
layers at batch 2 (a guided image), through each kernel a variant may use:

- ``fp32``: ``F.linear`` in float32 (what an unquantized layer runs);
- ``bf16``: ``F.linear`` on bfloat16 input and weight (the x86 backend's bf16 level where the
  CPU multiplies bf16 natively);
- ``bf16-weight-fp32``: the bf16 weight cast to float32 at each call, the product in float32
  (the x86 backend's bf16 level where it does not: ``x86_kernels.NATIVE_BF16``);
- ``x86-u8s8``: oneDNN's u8 x s8 product with int32 sums (``x86_kernels.linear``, the x86
  backend's int8 layers), the input already in codes;
- ``int_mm``: ``torch._int_mm``, s8 x s8 into int32 (torchao's int8 dynamic layers, eager).

Each round times every kernel once, in turn (a load on this shared machine weighs on all
alike); the median over ``--rounds`` rounds, after two warm-up calls each. Reported: ms, GFLOP/s
(2 x rows x in x out per product) and the time against fp32's. Writes
bench/results/cpu-gemm-<kernel flags>.json and .md, the flags being the CPU's VNNI, AMX and
BF16 ones (``no-vnni-no-bf16`` where it has none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.record import positive_int, save
from quantization.backends import x86_kernels

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (rows, in, out): batch 2 of each model's tokens or pixels at its native size
SHAPES: dict[str, tuple[int, int, int]] = {
    "dit-xl-2.qkv": (512, 1152, 3456),  # 2 x 256 tokens, hidden 1152
    "dit-xl-2.proj": (512, 1152, 1152),
    "dit-xl-2.fc1": (512, 1152, 4608),
    "dit-xl-2.fc2": (512, 4608, 1152),
    "sd15.attn-64x64": (8192, 320, 320),  # 2 x 64 x 64 latent pixels, 320 channels
    "sd15.geglu-64x64": (8192, 320, 2560),
    "sd15.attn-32x32": (2048, 640, 640),
    "sd15.attn-8x8": (128, 1280, 1280),
}
KERNELS = ("fp32", "bf16", "bf16-weight-fp32", "x86-u8s8", "int_mm")


def operands(rows: int, inp: int, out: int) -> dict[str, Callable[[], torch.Tensor]]:
    """One call per kernel on the same random operands."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inp, generator=g)
    w = torch.randn(out, inp, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    xq = torch.randint(0, x86_kernels.U8_MAX + 1, (rows, inp), dtype=torch.uint8, generator=g)
    xs = torch.randint(-127, 128, (rows, inp), dtype=torch.int8, generator=g)
    wq = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g)
    wq_t = wq.t()
    scale = torch.rand(out, generator=g)
    zero_point = (x86_kernels.U8_MAX + 1) // 2
    return {
        "fp32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "bf16-weight-fp32": lambda: F.linear(x, wb.float()),
        "x86-u8s8": lambda: x86_kernels.linear(xq, zero_point, wq, scale),
        "int_mm": lambda: torch._int_mm(xs, wq_t),
    }


def measure(name: str, rounds: int) -> dict[str, Any]:
    rows, inp, out = SHAPES[name]
    calls = operands(rows, inp, out)
    for call in calls.values():
        call()
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for kernel, call in calls.items():
            start = time.perf_counter()
            call()
            times[kernel].append((time.perf_counter() - start) * 1000)
    flop = 2 * rows * inp * out
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": name,
        "rows": rows,
        "in": inp,
        "out": out,
        "ms": {k: round(v, 3) for k, v in ms.items()},
        "gflops": {k: round(flop / v / 1e6, 1) for k, v in ms.items()},
        "over_fp32": {k: round(v / ms["fp32"], 3) for k, v in ms.items()},
    }


def flags() -> list[str]:
    """The CPU's flags that decide these kernels: VNNI and AMX int8, AVX-512 BF16 and AMX bf16."""
    return sorted(x86_kernels.cpu_flags() & (x86_kernels.VNNI_FLAGS | x86_kernels.BF16_FLAGS))


def markdown(record: dict) -> str:
    lines = [
        "# Matrix products on this CPU, by kernel",
        "",
        f"`{record['command']}`, {record['date']}, {record['machine']}, {record['threads']} torch "
        f"threads; kernel flags: {', '.join(record['flags']) or 'none (no VNNI, no BF16)'}; "
        f"x86_kernels.U8_MAX {record['u8_max']}, NATIVE_BF16 {record['native_bf16']}; load "
        f"average {record['load_average_1min']['start']} to {record['load_average_1min']['end']}. "
        f"Median of {record['rounds']} rounds; ms (time against fp32's).",
        "",
        "| shape | rows x in x out | " + " | ".join(KERNELS) + " |",
        "|---|---|" + "---:|" * len(KERNELS),
    ]
    for r in record["results"]:
        cells = [f"{r['ms'][k]:g} ({r['over_fp32'][k]:g}×)" for k in KERNELS]
        lines.append(
            f"| {r['shape']} | {r['rows']} x {r['in']} x {r['out']} | " + " | ".join(cells) + " |"
        )
    lines += ["", "GFLOP/s:", "", "| shape | " + " | ".join(KERNELS) + " |"]
    lines.append("|---|" + "---:|" * len(KERNELS))
    for r in record["results"]:
        lines.append(
            f"| {r['shape']} | " + " | ".join(f"{r['gflops'][k]:g}" for k in KERNELS) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_gemm", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--rounds", type=positive_int, default=10)
    p.add_argument(
        "--out", type=Path, help="JSON file (default bench/results/cpu-gemm-<flags>.json)"
    )
    args = p.parse_args(argv)
    found = flags()
    out = args.out or RESULTS / f"cpu-gemm-{'-'.join(found) or 'no-vnni-no-bf16'}.json"
    load_start = round(os.getloadavg()[0], 2)
    results = []
    for name in args.shapes:
        rows, inp, outs = SHAPES[name]
        print(f"[{name}] {rows} x {inp} x {outs}: {len(KERNELS)} kernels, {args.rounds} rounds",
              flush=True)  # fmt: skip
        results.append(measure(name, args.rounds))
        print(f"[{name}] ms {results[-1]['ms']}", flush=True)
    command = " ".join(["python -m bench.cpu_gemm", *(sys.argv[1:] if argv is None else argv)])
    record = save(
        out,
        command,
        threads=torch.get_num_threads(),
        flags=found,
        u8_max=x86_kernels.U8_MAX,
        native_bf16=x86_kernels.NATIVE_BF16,
        torch=torch.__version__,
        load_average_1min={"start": load_start, "end": round(os.getloadavg()[0], 2)},
        rounds=args.rounds,
        results=results,
    )
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
