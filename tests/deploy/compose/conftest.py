"""The compose stack that ``make compose-up`` started, reached only through the ports it
publishes on 127.0.0.1 and the docker command line. Nothing here starts the stack or takes it
down (``make test-deploy`` does both); what the tests measured is printed at the end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
API = "http://127.0.0.1:8000"
PROMETHEUS = "http://127.0.0.1:9090"
ENV_FILE = ROOT / "build" / "compose.env"  # the image names make chose (deploy/docker/prepare.sh)


def compose(*args: str) -> str:
    env_file = ["--env-file", str(ENV_FILE)] if ENV_FILE.exists() else []
    command = ["docker", "compose", *env_file, *args]
    return subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


def container(service: str) -> str:
    """The id of the service's one container."""
    ids = compose("ps", "-q", service).split()
    assert len(ids) == 1, f"{service}: {ids}"
    return ids[0]


def inspect(container_id: str, template: str) -> str:
    return docker("inspect", "-f", template, container_id).strip()


def job_view(http: httpx.Client, job_id: str) -> dict | None:
    """The job's record, or None while the API cannot answer (Redis restarting)."""
    try:
        reply = http.get(f"/v1/jobs/{job_id}")
    except httpx.HTTPError:
        return None
    return reply.json() if reply.status_code == 200 else None


def wait_job(http: httpx.Client, job_id: str, done, timeout: float, what: str) -> dict:
    return wait_until(
        lambda: (v := job_view(http, job_id)) is not None and done(v) and v, timeout, 0.05, what
    )


@pytest.fixture(scope="session")
def services() -> list[str]:
    """The running services; fails at once if there is no stack to test."""
    try:
        httpx.get(f"{API}/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"no API on {API} ({exc}): start the stack with make compose-up")
    return compose("ps", "--services").split()


@pytest.fixture(scope="session")
def models() -> dict[str, list[str]]:
    """Each model's variants, as the API serves them."""
    body = httpx.get(f"{API}/v1/models", timeout=10).json()
    return {m["id"]: [v["id"] for v in m["variants"]] for m in body["data"]}


@pytest.fixture
def http():
    with httpx.Client(base_url=API, timeout=60) as client:
        yield client


def pytest_terminal_summary(terminalreporter):
    """What the tests measured (their ``record_property``), printed whatever the outcome."""
    lines = [
        f"{name}: {value}"
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        if report.when == "call"
        for name, value in report.user_properties
    ]
    if lines:
        terminalreporter.write_sep("-", "the compose stack, measured")
        for line in lines:
            terminalreporter.write_line(line)
