"""A real Prometheus (Debian's package) scraping a running API and a worker hosting two
variants: scrapes pass ``promtool check metrics``, every PromQL expression of the dashboard
parses and runs, and the main panels return data after a few generations."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench.dashboard import grafana_to_promql
from bench.stack import start_prometheus
from tests.service.conftest import Server, WorkerProcess, free_port, make_settings, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "quantized-vs-fp.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
ALERT = "T2IJobsWaitingNoWorker"
# Panels that must show data after a few generations and a compare.
MAIN_PANELS = (
    "Generation latency p50 / p95 / p99",
    "Per-step latency p50 / p95",
    "Step latency p50 by path",
    "Step latency p50 over the fastest full-precision variant",
    "Throughput",
    "Queue depth",
    "Peak memory of the latest job",
    "Denoiser weight bytes",
    "Fidelity: PSNR against FP",
    "Fidelity: SQNR of latents against FP",
    "Workers up",
    "Resident weight bytes by variant and component",
    "Variant loads and evictions",
)


@pytest.fixture(scope="module")
def scraped(redis_url, registry_file, tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is missing (Debian package prometheus; make setup installs it)")
    settings = make_settings(redis_url, registry_file)
    port = free_port()
    serves = [("dit-digits", "fp32"), ("dit-digits", "w8a8")]
    worker = WorkerProcess(settings, name="prom-worker", metrics_port=port, serves=serves)
    folder = tmp_path_factory.mktemp("prometheus")
    with Server(settings) as server:
        worker.wait_ready()
        targets = {"api": [f"127.0.0.1:{server.port}"], "workers": [f"127.0.0.1:{port}"]}
        rules = [str(RULES)]
        process, url = start_prometheus(folder, targets, "1s", rules)
        prom = httpx.Client(base_url=url, timeout=10)
        try:
            wait_until(lambda: _query(prom, "sum(up)") == 2.0, 60, 0.5, what="2 targets up")
            with server.client() as http:
                for i in range(4):
                    for variant in ("fp32", "w8a8"):
                        body = {"model": "dit-digits", "prompt": str(i), "variant": variant}
                        assert http.post("/v1/images/generations", json=body).status_code == 200
                    time.sleep(0.5)
                compare = {"model": "dit-digits", "prompt": "seven", "variants": ["fp32", "w8a8"]}
                assert http.post("/v1/compare", json=compare).status_code == 200
                # stays queued: "spare" has no worker (its oldest queued age grows)
                spare = {"model": "dit-digits", "prompt": "seven", "variant": "spare"}
                assert http.post("/v1/jobs", json=spare).status_code == 202
                scrapes = {
                    "api": http.get("/metrics").text,
                    "worker": httpx.get(f"http://127.0.0.1:{port}/metrics").text,
                }
            time.sleep(4)  # a few scrapes after the traffic
            yield prom, scrapes
        finally:
            process.terminate()
            process.wait(10)
            worker.stop()


def _query(prom: httpx.Client, expr: str):
    """The first sample's value, or None (no sample, or Prometheus not answering yet)."""
    try:
        body = prom.get("/api/v1/query", params={"query": expr}).json()
    except (httpx.HTTPError, ValueError):  # not listening yet, or "Service Unavailable" text
        return None
    result = body.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def test_scrapes_pass_promtool_check_metrics(scraped):
    _, scrapes = scraped
    for name, text in scrapes.items():
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0, f"{name}: {check.stdout}{check.stderr}"


def test_every_dashboard_expression_runs_and_main_panels_have_data(scraped):
    prom, _ = scraped
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in dashboard["panels"]:
        results = []
        for target in panel["targets"]:
            reply = prom.get(
                "/api/v1/query",
                params={"query": grafana_to_promql(target["expr"], "dit-digits", "30s")},
            )
            body = reply.json()
            assert body["status"] == "success", f"{panel['title']}: {body}"
            results += body["data"]["result"]
        if panel["title"] in MAIN_PANELS and not results:
            empty.append(panel["title"])
    assert not empty, f"no data in {empty}"
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        metric = query[query.index("(") + 1 : query.index(",")].replace("$model", "dit-digits")
        label = query[query.rindex(",") + 1 : -1].strip()
        values = prom.get(f"/api/v1/label/{label}/values", params={"match[]": metric}).json()
        expected = {"model": "dit-digits", "variant": "fp32"}[variable["name"]]
        assert expected in values["data"], (variable["name"], values)


def test_recording_rules_evaluate(scraped):
    prom, _ = scraped
    wait_until(
        lambda: _query(prom, "count(t2i:generation_seconds:p95)"),
        20,
        0.5,
        what="the recording rules",
    )
    # The alert on jobs left waiting with no worker is loaded, evaluates, and does not fire for
    # the variants nobody serves here (idle, or one queued job far younger than its threshold).
    rule = wait_until(lambda: _alert_rule(prom, ALERT), 20, 0.5, what=f"an evaluation of {ALERT}")
    assert rule["state"] == "inactive", rule
    assert _series(prom, f'ALERTS{{alertname="{ALERT}"}}') == set()
    # Its expression with the age threshold at 0 s: the real scrapes join on model and variant
    # and pick out the one variant with a job waiting and no worker.
    groups = yaml.safe_load(RULES.read_text())["groups"]
    expr = next(r["expr"] for g in groups for r in g["rules"] if r.get("alert") == ALERT)
    assert "> 600" in expr
    waiting = wait_until(
        lambda: _series(prom, expr.replace("> 600", "> 0")), 20, 0.5, what="the waiting job"
    )
    assert waiting == {("dit-digits", "spare")}


def _alert_rule(prom: httpx.Client, name: str) -> dict | None:
    """The alerting rule as Prometheus has it, once it has evaluated without error."""
    groups = prom.get("/api/v1/rules", params={"type": "alert"}).json()["data"]["groups"]
    rule = next(r for g in groups for r in g["rules"] if r["name"] == name)
    return rule if rule["health"] == "ok" else None


def _series(prom: httpx.Client, expr: str) -> set[tuple[str, str]]:
    body = prom.get("/api/v1/query", params={"query": expr}).json()
    return {(r["metric"]["model"], r["metric"]["variant"]) for r in body["data"]["result"]}
