"""The deployment files, checked without a Docker engine or a cluster: Prometheus config and
rules through promtool, the dashboard's structure, compose and Kubernetes manifests parsed,
validated and cross-checked against the registry, the queue keys and the settings."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import app.worker.main as worker_main
from app.config import Settings
from app.queue.keys import Keys
from app.registry import WorkerSpec, load_registry

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "quantized-vs-fp.json"
SETTINGS_DOC = (ROOT / "docs" / "service.md").read_text()
KEDA_CRD = Path(__file__).resolve().parent / "keda.sh_scaledobjects.yaml"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing (Debian package prometheus; make setup installs it)")
    return path


def test_prometheus_config_and_rules_pass_promtool():
    folder = DEPLOY / "prometheus"
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "rules.test.yml"]):
        result = subprocess.run([_promtool(), *args], cwd=folder, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"model", "variant"} and variables["variant"]["includeAll"]
    for v in variables.values():
        assert v["datasource"]["uid"] == uid
    cells = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].startswith(
                ("histogram_quantile", "sum", "max", "t2i_")
            )
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in (
        "latency",
        "per-step",
        "throughput",
        "queue depth",
        "queue wait",
        "memory",
        "weight bytes",
        "psnr",
        "ssim",
        "sqnr",
        "error",
        "workers",
    ):
        assert needed in titles, needed
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/t2i.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


def _documented(name: str) -> bool:
    return f"`{name}`" in SETTINGS_DOC


def test_every_setting_is_documented():
    for field in Settings.model_fields:
        env = "REDIS_URL" if field == "redis_url" else f"T2I_{field.upper()}"
        assert _documented(env), f"{env} is not in docs/service.md"


def _known_env(name: str) -> bool:
    fields = {f"T2I_{f.upper()}" for f in Settings.model_fields} | {"REDIS_URL"}
    return name in fields or name == "HF_HUB_OFFLINE"


class _Parsed(Exception):
    def __init__(self, hosted: WorkerSpec) -> None:
        self.hosted = hosted


def _hosted(command: list[str], registry: Path, monkeypatch) -> WorkerSpec:
    """What a worker's command line hosts, read by app.worker's own parser and ``hosted_by``
    (its ``main()`` stopped right after them); the test fails on a line it would refuse."""
    assert command[:3] == ["python", "-m", "app.worker"], command
    hosted_by = worker_main.hosted_by

    def stop(args, parsed_registry):
        raise _Parsed(hosted_by(args, parsed_registry))

    with monkeypatch.context() as patch:
        patch.setattr(worker_main, "get_settings", lambda: Settings(registry=registry))
        patch.setattr(worker_main, "hosted_by", stop)
        try:
            worker_main.main(command[3:])
        except _Parsed as parsed:
            return parsed.hosted
        except SystemExit:
            pytest.fail(f"{command}: app.worker refuses it with {registry} (its error is above)")
    pytest.fail("app.worker's main() returned without calling hosted_by")


def test_compose_is_consistent(monkeypatch):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "prometheus", "grafana"} <= set(services)
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and services["redis"]["volumes"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition["condition"] == "service_healthy"
        env = service.get("environment", {}) if "t2i-service" in service.get("image", "") else {}
        for key in env:
            assert _known_env(key), f"{name}: {key} is not a setting"
            assert _documented(key) or key == "HF_HUB_OFFLINE"
        if "app.worker" in " ".join(service.get("command", [])):
            assert env["REDIS_URL"] == "redis://redis:6379/0"
    registry = ROOT / "models" / "registry.toml"
    served = set(load_registry(registry).served())
    workers = {n: s for n, s in services.items() if "app.worker" in " ".join(s.get("command", []))}
    hosted = {n: _hosted(s["command"], registry, monkeypatch) for n, s in workers.items()}
    cpu = {t for n, spec in hosted.items() if "profiles" not in workers[n] for t in spec.variants}
    assert cpu == served, "the CPU workers together host every registry variant"
    gpu = [n for n, s in workers.items() if "gpu" in s.get("profiles", [])]
    assert gpu and all(set(hosted[n].variants) <= served for n in gpu)
    for name in gpu:
        service = workers[name]
        assert service["image"] == "${SERVICE_IMAGE_CUDA:-t2i-service:cuda}"
        assert "/whl/cu" in service["build"]["args"]["TORCH_INDEX"]
        assert service["environment"]["T2I_DEVICE"] == "cuda"
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for name, spec in hosted.items():
        # healthy once every variant it hosts is warm: all of them load at start (no budget)
        test = workers[name]["healthcheck"]["test"][-1]
        warm = re.search(r"count\(b't2i_model_warmup_seconds\{'\) == (\d+)$", test)
        assert warm and int(warm[1]) == len(spec.variants), f"{name}: {test}"
        assert spec.memory_budget is None, f"{name}: with a budget not every variant loads at start"
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {
        t
        for job in scrape["scrape_configs"]
        for c in job.get("static_configs", [])
        for t in c["targets"]
    } | {
        f"{name}:{c['port']}"
        for job in scrape["scrape_configs"]
        for c in job.get("dns_sd_configs", [])
        for name in c["names"]
    }
    assert targets == {"api:8000"} | {f"{n}:9101" for n in workers}
    for name in workers:
        assert "--metrics-port" in services[name]["command"]
        assert "9101" in services[name]["healthcheck"]["test"][-1]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), "loopback only"
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]
    assert "grafana" in services["grafana"]["profiles"], "no Debian package: behind a profile"
    for name in workers:
        assert "compile-cache:/var/cache/t2i/compile" in services[name]["volumes"]


def test_dockerfile_builds_what_the_service_needs():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    assert re.search(r"^USER (?!root)\S+", text, re.M), "non-root user"
    assert "HEALTHCHECK" in text and "ARG TORCH_INDEX" in text
    assert text.index("torch==") < text.index("COPY --chown=t2i:t2i app/"), "deps before code"
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
    for folder in ("models/", "quality/", "pipelines/", "quantization/", "app/"):
        assert f"COPY --chown=t2i:t2i {folder}" in text
    assert "T2I_REGISTRY=/srv/models/registry.toml" in text
    assert "T2I_COMPILE_CACHE_DIR=/var/cache/t2i/compile" in text
    assert "build_extensions()" in text, "quanto's kernels built into the image"
    # every package the service imports is in the image
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"bench", "tests"}
    assert {f for f in packages if f"COPY --chown=t2i:t2i {f}/" not in text} == set()


def _k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_against_the_schemas():
    docs = [d for d in _k8s_docs() if not d["apiVersion"].startswith("keda.sh")]
    for doc in docs:
        kubernetes_validate.validate(doc, desired_version="1.30", strict=True)
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, desired_version="1.30", strict=True)


def _declared_only(schema: dict) -> dict:
    """A CRD's schema that refuses the fields it does not declare, as kubernetes_validate's
    strict mode does: the API server would drop them without a word (pruning)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: _declared_only(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _declared_only(schema[key])
    return schema


def test_keda_scaled_objects_validate_against_the_crd():
    crd = next(d for d in yaml.safe_load_all(KEDA_CRD.read_text()) if d)
    (version,) = crd["spec"]["versions"]
    validator = jsonschema.Draft7Validator(_declared_only(version["schema"]["openAPIV3Schema"]))
    scaled = [d for d in _k8s_docs() if d["apiVersion"].startswith("keda.sh")]
    assert scaled
    for doc in scaled:
        assert doc["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        assert doc["kind"] == crd["spec"]["names"]["kind"]
        validator.validate(doc)
    broken = copy.deepcopy(scaled[0])
    broken["spec"]["advanced"]["scalingModifier"] = broken["spec"]["advanced"].pop(
        "scalingModifiers"
    )
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_kubernetes_manifests_are_consistent(tmp_path, monkeypatch):
    docs = _k8s_docs()
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    # the cluster's registry is the shipped one, with paths inside the image
    text = (DEPLOY / "k8s/registry.toml").read_text()
    local = tmp_path / "registry.toml"
    local.write_text(text.replace("/srv/models", str(ROOT / "models")))
    registry = load_registry(local)
    served = set(registry.served())
    shipped = load_registry(ROOT / "models" / "registry.toml")
    assert {
        m: {a: (s.file, s.sha256) for a, s in spec.adapters.items()}
        for m, spec in registry.models.items()
    } == {
        m: {a: (s.file, s.sha256) for a, s in spec.adapters.items()}
        for m, spec in shipped.models.items()
    }, "the cluster's models have the shipped adapters"
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    workers = {
        n: d
        for n, d in deployments.items()
        if "app.worker" in d["spec"]["template"]["spec"]["containers"][0]["command"]
    }
    hosted = {
        n: _hosted(d["spec"]["template"]["spec"]["containers"][0]["command"], local, monkeypatch)
        for n, d in workers.items()
    }
    assert {t for spec in hosted.values() for t in spec.variants} == served, (
        "the workers together host every registry variant"
    )
    keys = Keys(Settings().key_prefix)
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in by_kind["ScaledObject"]}
    assert set(scaled) == set(workers), "a ScaledObject per worker Deployment"
    settings = next(c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == "t2i-settings")
    redis_host = settings["data"]["REDIS_URL"].split("//")[1].split(":")[0]
    budgets = {p["metadata"]["name"]: p for p in by_kind["PodDisruptionBudget"]}
    for name, deployment in workers.items():
        variants = hosted[name].variants
        spec = scaled[name]["spec"]
        # scale to zero, woken by the first job of any of its streams, unless a variant it
        # hosts refuses jobs while no worker is live
        required = any(registry.models[m].variants[v].require_worker for m, v in variants)
        assert spec["minReplicaCount"] == int(required) < spec["maxReplicaCount"], name
        assert "replicas" not in deployment["spec"], f"{name}: KEDA sets the replicas"
        # KEDA's formula sums exactly the streams of the variants the Deployment hosts
        triggers = {t["name"]: t for t in spec["triggers"]}
        assert len(triggers) == len(spec["triggers"]) == len(variants), name
        streams = {t["metadata"]["stream"] for t in triggers.values()}
        assert streams == {keys.stream(m, v) for m, v in variants}, name
        modifiers = spec["advanced"]["scalingModifiers"]
        terms = [term.strip() for term in modifiers["formula"].split("+")]
        assert sorted(terms) == sorted(triggers), f"{name}: {modifiers['formula']}"
        assert modifiers["metricType"] == "AverageValue" and float(modifiers["target"]) >= 1
        assert modifiers["activationTarget"] == "0", "the first job of any stream wakes it"
        for trigger_name, trigger in triggers.items():
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", trigger_name), "a formula variable"
            assert trigger["type"] == "redis-streams"
            # the stream's length (jobs waiting or running), not a consumer group's pending
            # entries (none while no worker runs)
            assert "consumerGroup" not in trigger["metadata"]
            assert trigger["metadata"]["address"].split(":")[0] == redis_host
        template = deployment["spec"]["template"]
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert labels.items() <= template["metadata"]["labels"].items(), name
        assert budgets[name]["spec"]["selector"]["matchLabels"] == labels, name
        container = template["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env.get("T2I_DEVICE", hosted[name].device) == hosted[name].device == "cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert template["spec"]["terminationGracePeriodSeconds"] >= 60
    for key in settings["data"]:
        assert _known_env(key) and (_documented(key) or key == "HF_HUB_OFFLINE"), key
    api = deployments["api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert settings["data"]["T2I_REGISTRY"] == "/etc/t2i/registry.toml"
    assert api["volumeMounts"][0]["mountPath"] == "/etc/t2i"
    services = {s["metadata"]["name"] for s in by_kind["Service"]}
    assert redis_host.split(".")[0] in services and "api" in services
    assert {
        p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for p in by_kind["PodDisruptionBudget"]
    } == {"t2i-api", "t2i-worker"}
    assert by_kind["StatefulSet"][0]["spec"]["volumeClaimTemplates"]
    secret = by_kind["Secret"][0]
    assert set(secret["stringData"]) == {"T2I_API_KEYS"}
