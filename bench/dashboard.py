"""What the Grafana dashboard shows, drawn with matplotlib from a real run's Prometheus data.

    python -m bench.dashboard [--seconds 120] [--model dit-digits]

Starts Redis, the API and a worker per variant of the model (metrics ports on), a Prometheus
(Debian's package) scraping them every 2 s, and sends traffic: bursts of async jobs to every
variant (so queues fill and drain), a compare every 10 s (fidelity). Then it runs the main
panels' PromQL from deploy/grafana/dashboards/quantized-vs-fp.json over the run and draws them
into docs/dashboard.png (Grafana itself cannot run here). Writes the series too, as
bench/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.record import save
from bench.stack import Stack, free_port, start_prometheus, wait_for

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "quantized-vs-fp.json"
PANELS = (
    "Generation latency p50 / p95 / p99",
    "Per-step latency p50 / p95",
    "Throughput",
    "Queue depth",
    "Queue wait p50 / p95",
    "Peak memory of the latest job",
    "Denoiser weight bytes",
    "Fidelity: PSNR against FP",
    "Fidelity: SQNR of latents against FP",
)
SCALE = {"s": (1000, "ms"), "bytes": (1 / 2**20, "MiB")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dashboard", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=int, default=120, help="length of the traffic")
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dashboard.json")
    args = parser.parse_args(argv)
    if shutil.which("prometheus") is None:  # before starting anything
        sys.exit("no prometheus on PATH (apt-get install prometheus)")

    from app.config import get_settings
    from app.registry import load_registry

    spec = load_registry(get_settings().registry).get(args.model)
    stack = Stack(torch_threads=1, queue_max=200, rate_limit_per_minute=100_000)
    folder = Path(tempfile.mkdtemp(prefix="t2i-prom-"))
    prometheus = None
    try:
        ports = {}
        for variant in spec.variants:
            ports[variant] = free_port()
            stack.start_worker(f"w-{variant}", args.model, variant, metrics_port=ports[variant])
        targets = {
            "api": [stack.url.removeprefix("http://")],
            "workers": [f"127.0.0.1:{p}" for p in ports.values()],
        }
        prometheus, prom_url = start_prometheus(folder, targets, "2s")
        prom = httpx.Client(base_url=prom_url, timeout=30)
        http = httpx.Client(base_url=stack.url, timeout=120)
        wait_for(lambda: _scraping(prom, len(ports) + 1), 60, "Prometheus scraping every target")
        start = time.time()
        _traffic(http, spec, args.seconds)
        time.sleep(6)
        end = time.time()
        series = _query_panels(prom, args.model, start, end)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        stack.close()
        shutil.rmtree(folder, ignore_errors=True)
    _plot(series, args.model, args.png)
    save(
        args.out, "python -m bench.dashboard", model=args.model, seconds=args.seconds, panels=series
    )
    print(f"wrote {args.png} and {args.out}")


def grafana_to_promql(expr: str, model: str, rate_interval: str) -> str:
    """A panel's query as Grafana runs it: the template variables filled in (all variants)."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$model", model)
        .replace("$variant", ".*")
    )


def _scraping(prom: httpx.Client, targets: int) -> bool:
    result = prom.get("/api/v1/query", params={"query": "sum(up)"}).json()["data"]["result"]
    return bool(result) and float(result[0]["value"][1]) == targets


def _traffic(http: httpx.Client, spec, seconds: int) -> None:
    """Bursts of async jobs to every variant, a compare every 10 s, until ``seconds`` pass."""
    classes = sorted(set(spec.labels.values())) or list(range(10))
    prompts = [str(c) for c in classes] if spec.labels else ["a red seven on a black background"]
    deadline = time.monotonic() + seconds
    next_compare, i = time.monotonic(), 0
    while time.monotonic() < deadline:
        burst = 2 + (i % 4) * 2
        ids = []
        for k in range(burst):
            variant = list(spec.variants)[k % len(spec.variants)]
            body = {
                "model": spec.name,
                "prompt": prompts[(i + k) % len(prompts)],
                "variant": variant,
            }
            response = http.post("/v1/jobs", json=body)
            response.raise_for_status()
            ids.append(response.json()["id"])
        if time.monotonic() >= next_compare:
            http.post("/v1/compare", json={"model": spec.name, "prompt": prompts[i % len(prompts)]})
            next_compare = time.monotonic() + 10
        while ids:
            ids = [
                j
                for j in ids
                if http.get(f"/v1/jobs/{j}").json()["status"]
                not in ("completed", "failed", "cancelled")
            ]
            time.sleep(0.2)
        i += 1


def _query_panels(prom: httpx.Client, model: str, start: float, end: float) -> dict:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    out = {}
    for title in PANELS:
        panel = panels[title]
        lines = []
        for target in panel["targets"]:
            expr = grafana_to_promql(target["expr"], model, "20s")
            body = prom.get(
                "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": 2}
            ).json()
            for result in body["data"]["result"]:
                label = target["legendFormat"]
                for key, value in result["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                points = [
                    (float(t) - start, float(v))
                    for t, v in result["values"]
                    if v not in ("NaN", "+Inf", "-Inf")
                ]
                if points:
                    lines.append({"label": label, "points": points})
        out[title] = {"unit": panel["fieldConfig"]["defaults"]["unit"], "lines": lines}
    return out


def _plot(series: dict, model: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    for ax, (title, panel) in zip(axes.flat, series.items(), strict=True):
        factor, unit = SCALE.get(
            panel["unit"], (1, panel["unit"] if panel["unit"] != "none" else "")
        )
        if panel["unit"] == "reqps":
            unit = "images/s"
        if title == "Denoiser weight bytes":
            labels = [line["label"] for line in panel["lines"]]
            values = [line["points"][-1][1] * factor for line in panel["lines"]]
            ax.barh(labels, values, color="tab:blue")
            for y, v in enumerate(values):
                ax.text(v, y, f" {v:.2f}", va="center")
        else:
            for line in panel["lines"]:
                t, v = zip(*line["points"], strict=True)
                ax.plot(t, [x * factor for x in v], label=line["label"], linewidth=1.2)
            ax.set_xlabel("seconds into the run")
            if panel["lines"]:
                ax.legend(fontsize=7, loc="upper left")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Quantized vs full precision — {model} (Prometheus data of `python -m bench.dashboard`)"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)


if __name__ == "__main__":
    main()
