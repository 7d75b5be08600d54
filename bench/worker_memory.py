"""Memory of the service's worker processes as ``make run`` starts them, one layout beside the
other in one run:

    python -m bench.worker_memory [--layouts shared per-variant] [--out bench/results]

- ``shared``: ``python -m app`` on the shipped registry, as the README says: the registry
  has no [workers] table, so one worker process hosts all six variants, sharing each model's
  text encoder and VAE.
- ``per-variant``: the same command on a copy of the registry with one ``[workers.NAME]``
  table per variant: six processes, the layout before workers hosted several variants.

Each layout runs on its own Redis and ports; once every variant has a live worker (its
heartbeat: loaded and warmed up), the resident set (VmRSS) of every ``app.worker`` process
``python -m app`` started is read, with the time the layout took to come up. The compiled
variants share one torch.compile cache folder, warm after the first layout that compiles.
Writes ``worker-memory.json`` and ``worker-memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.config import DEFAULT_REGISTRY
from app.registry import load_registry
from bench.stack import free_port, wait_for

LAYOUTS = ("shared", "per-variant")
READY_TIMEOUT_S = 1800.0


def per_variant_registry(folder: Path) -> Path:
    """The shipped registry with absolute paths and one worker table per variant."""
    registry = load_registry(DEFAULT_REGISTRY)
    text = DEFAULT_REGISTRY.read_text()
    base = DEFAULT_REGISTRY.parent
    text = re.sub(
        r'^(source|artifact) = "([^"]+)"',
        lambda m: f'{m.group(1)} = "{(base / m.group(2)).resolve()}"',
        text,
        flags=re.MULTILINE,
    )
    for model, variant in registry.served():
        text += f'\n[workers.{model}-{variant}]\nvariants = ["{model}/{variant}"]\n'
    path = folder / "registry-per-variant.toml"
    path.write_text(text)
    return path


def worker_processes(parent: int) -> dict[int, str]:
    """pid -> command line of the ``app.worker`` processes whose parent is ``parent``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and "app.worker" in command:
            found[int(entry.name)] = command
    return found


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def run_layout(layout: str, folder: Path, cache: Path) -> dict:
    registry_path = DEFAULT_REGISTRY if layout == "shared" else per_variant_registry(folder)
    served = load_registry(registry_path).served()
    port = free_port()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        T2I_REGISTRY=str(registry_path),
        T2I_COMPILE_CACHE_DIR=str(cache),
    )
    env.pop("REDIS_URL", None)  # python -m app starts its own
    command = [sys.executable, "-m", "app", "--port", str(port)]
    command += ["--redis-port", str(free_port()), "--data-dir", str(folder / layout)]
    command += ["--workers-metrics-port", "0"]
    print(f"{layout}: {' '.join(command[1:])} ({len(served)} variants)", flush=True)
    began = time.monotonic()
    app = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def all_live() -> bool:
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"]
            live = [v["workers"] > 0 for m in models for v in m["variants"]]
            done = sum(live)
            print(f"  {layout}: {done}/{len(live)} variants live", end="\r", flush=True)
            return done == len(live)

        wait_for(all_live, READY_TIMEOUT_S, f"every variant of {layout}", every=2.0)
        ready_s = time.monotonic() - began
        time.sleep(5.0)  # past the warm-up's last allocations
        workers = worker_processes(app.pid)
        rows = [
            {"pid": pid, "command": cmd, "rss_bytes": rss_bytes(pid)}
            for pid, cmd in workers.items()
        ]
    finally:
        app.send_signal(signal.SIGINT)
        try:
            app.wait(120)
        except subprocess.TimeoutExpired:
            app.kill()
    total = sum(r["rss_bytes"] for r in rows)
    print(f"\n  {layout}: {len(rows)} workers, {total / 1e9:.3f} GB RSS, up in {ready_s:.0f} s")
    return {
        "layout": layout,
        "variants": len(served),
        "worker_processes": len(rows),
        "rss_bytes_total": total,
        "ready_s": round(ready_s, 1),
        "workers": sorted(rows, key=lambda r: r["command"]),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "# Worker memory of `python -m app` (the README's `make run`)",
        "",
        "| layout | variants | worker processes | summed RSS | per process | up in |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        each = ", ".join(f"{w['rss_bytes'] / 1e6:.0f}" for w in r["workers"])
        lines.append(
            f"| {r['layout']} | {r['variants']} | {r['worker_processes']} | "
            f"{r['rss_bytes_total'] / 1e9:.3f} GB | {each} MB | {r['ready_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.worker_memory", description=__doc__.split("\n")[0]
    )
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="t2i-memory-") as tmp:
        folder = Path(tmp)
        cache = folder / "compile-cache"
        results = [run_layout(layout, folder, cache) for layout in args.layouts]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpu_count": os.cpu_count(),
        "command": "python -m bench.worker_memory " + " ".join(argv or sys.argv[1:]),
    }
    (args.out / "worker-memory.json").write_text(
        json.dumps({**meta, "layouts": results}, indent=1) + "\n"
    )
    (args.out / "worker-memory.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
