"""An x86 artifact's bf16 layers, computed in bf16 and in float32, side by side in one run.

    python -m bench.x86_bf16                                   # t2i-digits' served w8a8
    python -m bench.x86_bf16 --artifact models/quantized/t2i-digits-w8a8 --rounds 40

The artifact's denoiser is loaded twice (``quantization.load_quantized_denoiser``): in one
copy its ``Bf16Linear`` / ``Bf16Conv2d`` layers multiply in bf16 (oneDNN's bf16 kernels,
the hardware's on a CPU with AVX-512 BF16 or AMX, a software conversion elsewhere), in the
other they cast their bf16 weights to float32 at each call and multiply in float32 (what
``x86_kernels.NATIVE_BF16`` picks where the CPU has no bf16 in hardware). Each copy runs
eager and ``torch.compile``d (as a worker with ``compile = true`` runs it). One denoiser call
of a guided request for one image (batch 2, t = 500); every round times the four in turn (a
load on this shared machine weighs on all alike); the median over ``--rounds`` rounds after
warm-up calls. Also the SQNR of each copy's output against the float model's on the same
inputs. Writes bench/results/x86-bf16-<model>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.record import positive_int, save
from models.targets import denoiser_inputs, evaluation_targets
from pipelines.loader import compile_denoiser, read_defaults
from quality.metrics import sqnr_db
from quantization.artifact import load_quantized_denoiser, open_source
from quantization.backends import x86, x86_kernels
from quantization.blocks import denoiser_attr

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_ARTIFACT = ROOT / "models" / "quantized" / "t2i-digits-w8a8"
MODES = ("bf16", "float32")


def bf16_layers(denoiser: torch.nn.Module) -> list[x86.Bf16Linear | x86.Bf16Conv2d]:
    return [m for m in denoiser.modules() if isinstance(m, x86.Bf16Linear | x86.Bf16Conv2d)]


def set_mode(denoiser: torch.nn.Module, mode: str) -> int:
    """Make every bf16 layer of ``denoiser`` multiply in ``mode``; how many there are."""
    layers = bf16_layers(denoiser)
    for layer in layers:
        layer.hardware_bf16 = mode == "bf16"  # the instance's, over the class's default
    return len(layers)


def compiled(denoiser: torch.nn.Module) -> torch.nn.Module:
    """``denoiser`` compiled exactly as a worker compiles it (``compile_denoiser``)."""

    holder = SimpleNamespace(transformer=denoiser)
    compile_denoiser(holder)
    return holder.transformer


@torch.no_grad()
def measure(artifact: Path, rounds: int) -> dict:
    manifest, first = load_quantized_denoiser(artifact)
    _, second = load_quantized_denoiser(artifact)
    source = ROOT / manifest["source"]
    fp_pipe = open_source(source, torch_dtype=torch.float32)
    attr = denoiser_attr(fp_pipe)
    fp = getattr(fp_pipe, attr).eval()
    count = set_mode(first, "bf16")
    set_mode(second, "float32")
    if count == 0:
        raise SystemExit(f"{artifact}: no bf16 layers in its plan, nothing to compare")
    cfg = fp.config
    with_colors = read_defaults(source)["kind"] == "text-to-image"
    targets = evaluation_targets(1, with_colors=with_colors, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    inputs = denoiser_inputs(fp_pipe, targets, x, torch.full((2,), 500))
    reference = fp(**inputs).sample
    runs = {
        ("bf16", "eager"): first,
        ("float32", "eager"): second,
        ("bf16", "compiled"): compiled(first),
        ("float32", "compiled"): compiled(second),
    }
    outputs = {}
    for key, model in runs.items():
        print(f"[{key[0]} {key[1]}] warming up", flush=True)
        for _ in range(3):  # the compiled ones compile here
            outputs[key] = model(**inputs).sample
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, model in runs.items():
            start = time.perf_counter()
            model(**inputs)
            times[key].append((time.perf_counter() - start) * 1000)
    rows = []
    for key in runs:
        mode, how = key
        rows.append(
            {
                "bf16_layers_in": mode,
                "run": how,
                "step_ms": round(statistics.median(times[key]), 3),
                "step_ms_min_max": [round(min(times[key]), 3), round(max(times[key]), 3)],
                "sqnr_vs_float_model_db": round(sqnr_db(reference, outputs[key]), 2),
            }
        )
    return {
        "artifact": str(artifact.relative_to(ROOT))
        if artifact.is_relative_to(ROOT)
        else str(artifact),
        "bf16_layers": count,
        "layers": len(manifest["layers"]),
        "measured_on_flags": manifest.get("measured_on", {}).get("kernel_flags"),
        "rows": rows,
    }


def markdown(record: dict) -> str:
    lines = [
        f"# {record['artifact']}: its bf16 layers in bf16 and in float32",
        "",
        f"`{record['command']}`, {record['date']}, {record['machine']}, {record['threads']} torch "
        f"threads, this CPU's kernels: {record['kernels']}; load average "
        f"{record['load_average_1min']['start']} to {record['load_average_1min']['end']}. "
        f"{record['bf16_layers']} of the plan's {record['layers']} layers are bf16. One denoiser "
        f"call at batch 2 (one guided image), median of {record['rounds']} interleaved rounds.",
        "",
        "| bf16 layers multiply in | run | step ms (min, max) | SQNR vs the float model, dB |",
        "|---|---|---:|---:|",
    ]
    for r in record["rows"]:
        low, high = r["step_ms_min_max"]
        lines.append(
            f"| {r['bf16_layers_in']} | {r['run']} | {r['step_ms']:g} ({low:g}, {high:g}) | "
            f"{r['sqnr_vs_float_model_db']:g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.x86_bf16", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    p.add_argument("--rounds", type=positive_int, default=30)
    p.add_argument(
        "--out", type=Path, help="JSON file (default bench/results/x86-bf16-<model>.json)"
    )
    args = p.parse_args(argv)
    artifact = args.artifact.resolve()
    out = args.out or RESULTS / f"x86-bf16-{artifact.name}.json"
    load_start = round(os.getloadavg()[0], 2)
    result = measure(artifact, args.rounds)
    command = " ".join(["python -m bench.x86_bf16", *(sys.argv[1:] if argv is None else argv)])
    record = save(
        out,
        command,
        threads=torch.get_num_threads(),
        kernels=x86_kernels.KERNELS,
        load_average_1min={"start": load_start, "end": round(os.getloadavg()[0], 2)},
        rounds=args.rounds,
        **result,
    )
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
