"""What a request with a new adapter costs, through the service, against a plain request:

    python -m bench.lora_requests [--rounds 3] [--steps 20] [--out bench/results]

One worker serves the README's registry (models/registry.toml: both embedded models, fp32,
w8a8 compiled, w4a8-sqnr, each with its "italic" adapter) behind a real API and Redis. Per
variant, one request at a time (OpenAI's ``/v1/images/generations``, n=1): five plain
requests (the median is the plain cost), then per round the first request with a new
adapter set (italic at a scale not used before: its buffers are written and, on a compiled
variant, nothing may recompile), the same set again, and a plain request after it. Reports
each request's latency and its ratio to the plain median; the acceptance is the compiled
variants' first-new-set ratio ≤ 2. Writes ``lora-requests.json`` and ``lora-requests.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from app.registry import load_registry
from bench.stack import Stack

REGISTRY = Path(__file__).resolve().parents[1] / "models" / "registry.toml"
PROMPTS = {"dit-digits": "a seven", "t2i-digits": "a red seven on a black background"}


def timed(http: httpx.Client, model: str, variant: str, steps: int, lora: list | None) -> float:
    body: dict = {"model": model, "prompt": PROMPTS[model], "variant": variant, "steps": steps}
    body["seed"] = 11
    if lora is not None:
        body["lora"] = lora
    t0 = time.perf_counter()
    response = http.post("/v1/images/generations", json=body)
    seconds = time.perf_counter() - t0
    response.raise_for_status()
    return seconds


def measure(http: httpx.Client, model: str, variant: str, steps: int, rounds: int) -> dict:
    plain = [timed(http, model, variant, steps, None) for _ in range(5)]
    base = statistics.median(plain)
    rows = []
    for r in range(rounds):
        lora = [{"name": "italic", "scale": round(1.0 - 0.1 * r, 2)}]  # a set not seen before
        first = timed(http, model, variant, steps, lora)
        again = timed(http, model, variant, steps, lora)
        after = timed(http, model, variant, steps, None)
        rows.append(
            {
                "scale": lora[0]["scale"],
                "first_s": round(first, 4),
                "again_s": round(again, 4),
                "plain_after_s": round(after, 4),
                "first_ratio": round(first / base, 3),
                "again_ratio": round(again / base, 3),
            }
        )
    plain_s = [round(p, 4) for p in plain]
    return {"plain_s": plain_s, "plain_median_s": round(base, 4), "rounds": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_requests", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    registry = load_registry(REGISTRY)
    served = registry.served()
    print(f"starting one worker for {len(served)} variants (the compiled ones compile: minutes)")
    stack = Stack(torch_threads="2", registry=str(REGISTRY), generation_timeout_s="600")
    results: dict = {
        "command": "python -m bench.lora_requests",
        "steps": args.steps,
        "load_average_start": os.getloadavg()[0],
        "variants": {},
    }
    try:
        t0 = time.perf_counter()
        # six variants, two of them compiled with every path warmed: on this 2-core AVX2 CPU
        # (2026-12-05) a start with Inductor's cache empty sent no heartbeat within 180 s,
        # the next one was ready in 114 s
        stack.start_worker("lora", serves=served, ready_s=600)
        print(f"worker ready in {time.perf_counter() - t0:.0f} s")
        with httpx.Client(base_url=stack.url, timeout=600) as http:
            for model, variant in served:
                compiled = registry.models[model].variants[variant].compile
                out = measure(http, model, variant, args.steps, args.rounds)
                out["compiled"] = compiled
                results["variants"][f"{model}/{variant}"] = out
                firsts = [r["first_ratio"] for r in out["rounds"]]
                print(
                    f"{model}/{variant}{' (compiled)' if compiled else ''}: plain "
                    f"{1000 * out['plain_median_s']:.0f} ms; first request of a new adapter "
                    f"set {', '.join(f'{f:.2f}x' for f in firsts)}"
                )
    finally:
        stack.close()
    results["load_average_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora-requests.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "lora-requests.md").write_text(markdown(results))
    print(f"wrote {args.out / 'lora-requests.md'}")


def markdown(results: dict) -> str:
    lines = [
        "# A request with a new LoRA adapter set against a plain request",
        "",
        f"`{results['command']}`: {results['steps']} steps, n=1, one request at a time, one "
        "worker serving every variant of models/registry.toml. Load average "
        f"{results['load_average_start']:.1f} at the start, {results['load_average_end']:.1f} "
        "at the end.",
        "",
        "| variant | compiled | plain median | first request, new set (× plain) | same set again "
        "(× plain) | plain after |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        rounds = v["rounds"]
        first = ", ".join(f"{r['first_ratio']:.2f}" for r in rounds)
        again = ", ".join(f"{r['again_ratio']:.2f}" for r in rounds)
        after = ", ".join(f"{1000 * r['plain_after_s']:.0f}" for r in rounds)
        compiled = "yes" if v["compiled"] else "no"
        lines.append(
            f"| {name} | {compiled} | {1000 * v['plain_median_s']:.0f} ms | {first} | {again} "
            f"| {after} ms |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
