"""Latency of one worker hosting three variants, all resident against a budget that holds two:

    python -m bench.residency [--requests 60] [--clients 6] [--budget 19MB] [--out bench/results]

dit-digits' fp32, w8a8 and w4a8-sqnr (denoisers of 11.5, 5.7 and 5.2 MB beside one shared
VAE; any two fit 19 MB, all three do not) behind a real API and Redis. ``--requests`` requests
go round-robin over the three variants from ``--clients`` clients (OpenAI's
``/v1/images/generations``, 2 steps), first with no budget (every variant loaded at start),
then under the budget (loaded at first use, the least recently used evicted). The variants
run eager: a compiled one's warm-up would dominate every load. Per case:
latency p50 / p99 per request, the worker's loads and evictions from its /metrics, failures.
Writes ``residency.json`` and ``residency.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.load_test import _percentile
from bench.stack import Stack, free_port

VARIANTS = [("dit-digits", "fp32"), ("dit-digits", "w8a8"), ("dit-digits", "w4a8-sqnr")]


def counter(scrape: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines() if line.startswith(name + "{")
    )


def registry(folder: Path) -> Path:
    """The three variants, eager (a compiled variant's warm-up would dominate every load)."""
    models = Path(__file__).resolve().parents[1] / "models"
    path = folder / "registry-residency.toml"
    text = f'[models.dit-digits]\nsource = "{models / "dit-digits"}"\nsizes = ["32x32"]\n'
    text += '[models.dit-digits.variants.fp32]\ndtype = "fp32"\n'
    for name in ("w8a8", "w4a8-sqnr"):
        artifact = models / "quantized" / f"dit-digits-{name}"
        text += f'[models.dit-digits.variants.{name}]\nartifact = "{artifact}"\n'
    path.write_text(text)
    return path


def run_case(budget: str | None, requests: int, clients: int, folder: Path) -> dict:
    stack = Stack(torch_threads="1", batch_max="4", registry=str(registry(folder)))
    port = free_port()
    try:
        stack.start_worker("residency", serves=VARIANTS, memory_budget=budget, metrics_port=port)
        latencies: list[float] = []
        failures: list[str] = []

        def ask(i: int) -> None:
            model, variant = VARIANTS[i % len(VARIANTS)]
            body = {"model": model, "variant": variant, "prompt": "a seven", "steps": 2}
            t0 = time.perf_counter()
            r = httpx.post(
                f"{stack.url}/v1/images/generations", json=body | {"seed": i}, timeout=300
            )
            if r.status_code == 200:
                latencies.append(1000 * (time.perf_counter() - t0))
            else:
                failures.append(f"{variant}: {r.status_code} {r.text[:200]}")

        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(ask, range(requests)))
        wall = time.perf_counter() - began
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        stack.close()
    case = {
        "budget": budget,
        "requests": requests,
        "clients": clients,
        "answered": len(latencies),
        "failures": failures,
        "wall_s": round(wall, 1),
        "latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "latency_ms_p99": round(_percentile(latencies, 0.99), 1) if latencies else None,
        "loads": counter(scrape, "t2i_variant_loads_total"),
        "evictions": counter(scrape, "t2i_variant_evictions_total"),
    }
    print(json.dumps(case), flush=True)
    return case


def markdown(cases: list[dict]) -> str:
    lines = [
        "# One worker, three dit-digits variants: all resident against a budget of two",
        "",
        "| budget | answered | p50 | p99 | loads | evictions | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c['budget'] or 'none (all resident)'} | {c['answered']}/{c['requests']} | "
            f"{c['latency_ms_p50']} ms | {c['latency_ms_p99']} ms | {c['loads']:.0f} | "
            f"{c['evictions']:.0f} | {c['wall_s']} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.residency", description=__doc__.split("\n")[0]
    )
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--budget", default="19MB")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="t2i-residency-") as tmp:
        cases = [run_case(b, args.requests, args.clients, Path(tmp)) for b in (None, args.budget)]
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.residency " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "residency.json").write_text(
        json.dumps({"command": command, "cases": cases}, indent=1) + "\n"
    )
    (args.out / "residency.md").write_text(markdown(cases))
    print(markdown(cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
