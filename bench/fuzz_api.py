"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document: no request may
get a 5xx.

    pip install schemathesis      # in a venv of its own: it registers a pytest plugin
    python -m bench.fuzz_api --schemathesis /path/to/that/venv/bin/schemathesis

Starts a stack (redis-server, the API, one full-precision worker per embedded model; the
registry allows at most 8 steps so that generated jobs finish quickly) and runs schemathesis
on every operation of ``/openapi.json`` with its ``not_a_server_error`` check and stateful
links. Writes bench/results/fuzz-api.json: per operation the requests sent and the failures
found, and the schemathesis command line. Exits 1 if any failure was found.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.record import save
from bench.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL = """
[models.{name}]
source = "{models}/{name}"
max_steps = 8
default_steps = 4
sizes = ["32x32"]
[models.{name}.variants.fp32]
dtype = "fp32"
"""
FUZZED = ("dit-digits", "t2i-digits")


def _junit(path: Path) -> dict[str, dict]:
    """Per operation, from schemathesis' JUnit report: failures and their first messages."""
    operations = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        problems = [e.get("message") or (e.text or "")[:500] for e in case if e.tag != "system-out"]
        operations[case.get("name")] = {"failures": len(problems), "messages": problems[:3]}
    return operations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.fuzz_api",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--schemathesis", default=shutil.which("schemathesis") or "schemathesis")
    p.add_argument("--max-examples", type=int, default=60, help="per operation (default 60)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "fuzz-api.json")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="t2i-fuzz-"))
    registry = folder / "registry.toml"
    registry.write_text("".join(MODEL.format(name=m, models=MODELS) for m in FUZZED))
    stack = Stack(
        registry=str(registry),
        generation_timeout_s=120,
        torch_threads=1,
        rate_limit_per_minute=1_000_000,
    )
    try:
        for model in FUZZED:
            stack.start_worker(model, model, "fp32")
        command = [
            args.schemathesis,
            "run",
            f"{stack.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(args.max_examples),
            "--seed",
            str(args.seed),
            "--request-timeout",
            "150",
            "--report",
            "junit",
            "--report-junit-path",
            str(folder / "junit.xml"),
        ]
        start = time.monotonic()
        run = subprocess.run(command, capture_output=True, text=True)
        seconds = time.monotonic() - start
    finally:
        stack.close()
    print(run.stdout[-6000:])
    if not (folder / "junit.xml").is_file():
        print(run.stderr[-3000:], file=sys.stderr)
        return 2
    operations = _junit(folder / "junit.xml")
    failures = sum(o["failures"] for o in operations.values())
    summary = [line for line in run.stdout.splitlines() if line.strip()][-12:]
    save(
        args.out,
        "python -m bench.fuzz_api",
        schemathesis=subprocess.run(
            [args.schemathesis, "--version"], capture_output=True, text=True
        ).stdout.strip(),
        max_examples=args.max_examples,
        seed=args.seed,
        seconds=round(seconds, 1),
        exit_code=run.returncode,
        failures=failures,
        operations=operations,
        summary=summary,
    )
    print(json.dumps({"failures": failures, "operations": len(operations)}))
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
