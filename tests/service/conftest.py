"""A real redis-server for the session; the API in a real uvicorn server; real workers.

Redis and the workers are app.supervisor's, as in ``python -m app`` and the benchmarks.

Each test gets its own key prefix, so tests share one Redis without seeing each other's jobs.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from app import supervisor
from app.config import Settings
from app.supervisor import StartError, settings_env, start_redis
from bench.stack import free_port
from tests.waiting import wait_until

MODELS = Path(__file__).resolve().parents[2] / "models"

# dit-digits and t2i-digits in full precision and w8a8; "spare" has no worker in
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
[models.t2i-digits.variants.w8a8]
artifact = "{MODELS / "quantized" / "t2i-digits-w8a8"}"
[models.t2i-digits.variants.strict]
dtype = "fp32"
require_worker = true
"""


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A redis-server of the session, without persistence (the integration tier's)."""
    try:
        server = start_redis(free_port(), tmp_path_factory.mktemp("redis"))
    except StartError as exc:
        pytest.fail(f"{exc}; .ci/run installs it")
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def registry_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("registry") / "registry.toml"
    path.write_text(REGISTRY)
    return path


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a worker process the same settings (every one of them)."""
    env = dict(os.environ, **settings_env(settings.model_dump()))
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


class WorkerProcess(supervisor.WorkerProcess):
    """``python -m app.worker`` for one variant (``model``/``variant``), or for several
    (``serves``), with ``service_env(settings)``, started at once; ready once a heartbeat of
    this process is in Redis."""

    def __init__(
        self,
        settings: Settings,
        model: str | None = None,
        variant: str | None = None,
        name: str | None = None,
        metrics_port: int | None = None,
        *,
        serves: list[tuple[str, str]] | None = None,
        memory_budget: str | None = None,
        env: dict[str, str] | None = None,
    ):
        name = name or f"w-{uuid.uuid4().hex[:6]}"
        variants = serves or [(model, variant)]
        environment = service_env(settings, **(env or {}))
        super().__init__(variants, environment, name, metrics_port or None, memory_budget)
        self.settings = settings
        self.start()

    def wait_ready(self, timeout: float = 300.0) -> WorkerProcess:
        """A compiled variant compiles every path before the first heartbeat: about 100 s
        on 2 idle cores for dit-digits on x86, 137 s with other jobs on the machine."""
        try:
            return super().wait_ready(timeout)
        except StartError as exc:  # a test failure, as it was before app.supervisor
            raise AssertionError(str(exc)) from exc


@contextmanager
def serving(settings: Settings, workers: Iterable[supervisor.WorkerProcess]) -> Iterator[Server]:
    """The API in a Server once every worker process is ready; the workers stopped after,
    whatever happened. ``workers`` is read again at the end: given a dict's values, the
    workers that replaced killed ones are stopped too."""
    try:
        with Server(settings) as server:
            for w in workers:
                w.wait_ready()
            yield server
    finally:
        for w in workers:
            w.stop()
