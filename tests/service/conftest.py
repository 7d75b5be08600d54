"""A real redis-server for the session; the API in a real uvicorn server; real workers.

Each test gets its own key prefix, so tests share one Redis without seeing each other's jobs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn

from app.config import Settings
from bench.stack import free_port

MODELS = Path(__file__).resolve().parents[2] / "models"

# dit-digits in full precision and w8a8, t2i-digits in full precision; "spare" has no worker in
# any test, so jobs sent to it stay queued; "strict" refuses jobs while it has no live worker.
REGISTRY = f"""
[models.dit-digits]
source = "{MODELS / "dit-digits"}"
max_steps = 2000
sizes = ["32x32"]
[models.dit-digits.variants.fp32]
dtype = "fp32"
[models.dit-digits.variants.w8a8]
artifact = "{MODELS / "quantized" / "dit-digits-w8a8"}"
[models.dit-digits.variants.spare]
dtype = "fp32"

[models.t2i-digits]
source = "{MODELS / "t2i-digits"}"
max_steps = 2000
sizes = ["32x32"]
[models.t2i-digits.variants.fp32]
dtype = "fp32"
[models.t2i-digits.variants.strict]
dtype = "fp32"
require_worker = true
"""


def wait_until(predicate, timeout: float = 30.0, every: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_until(lambda: _pings(client), 10, what="redis-server")
    yield url
    process.terminate()
    process.wait(10)


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def registry_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("registry") / "registry.toml"
    path.write_text(REGISTRY)
    return path


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a worker process the same settings (every one of them)."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        env["REDIS_URL" if name == "redis_url" else f"T2I_{name.upper()}"] = str(value)
    env.update(T2I_TORCH_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def make_settings(redis_url: str, registry_file: Path, **overrides) -> Settings:
    values = dict(
        redis_url=redis_url,
        registry=registry_file,
        key_prefix=f"test-{uuid.uuid4().hex[:8]}",
        reclaim_idle_s=2.0,
        heartbeat_s=0.5,
        max_deliveries=2,
        generation_timeout_s=60.0,
    )
    values.update(overrides)
    return Settings(**values)


class Server:
    """The API in a uvicorn server on a free port, in a thread of the test process."""

    def __init__(self, settings: Settings) -> None:
        from app.main import create_app

        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        wait_until(lambda: self.server.started, 20, what="uvicorn")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=90, **kwargs)


class WorkerProcess:
    """``python -m app.worker`` for one variant; ready once its heartbeat is in Redis."""

    def __init__(
        self,
        settings: Settings,
        model: str,
        variant: str,
        name: str | None = None,
        metrics_port: int | None = None,
    ):
        self.settings, self.model, self.variant = settings, model, variant
        self.name = name or f"w-{uuid.uuid4().hex[:6]}"
        command = [
            sys.executable,
            "-m",
            "app.worker",
            "--model",
            model,
            "--variant",
            variant,
            "--name",
            self.name,
        ]
        if metrics_port:
            command += ["--metrics-port", str(metrics_port)]
        self.started = time.time()
        self.process = subprocess.Popen(command, env=service_env(settings))

    def wait_ready(self, timeout: float = 120.0) -> WorkerProcess:
        from app.queue.keys import Keys

        client = redis.Redis.from_url(self.settings.redis_url)
        key = Keys(self.settings.key_prefix).workers(self.model, self.variant)

        def ready():
            assert self.process.poll() is None, f"worker exited with {self.process.returncode}"
            beat = client.zscore(key, self.name)  # a heartbeat of this process, not a stale one
            return beat is not None and beat >= self.started

        wait_until(ready, timeout, 0.2, what=f"worker {self.name}")
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode
