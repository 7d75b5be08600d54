"""app.supervisor: early failure, stop and restart on scripted stand-ins for workers (unit
tier: no Redis, no worker), and the redis-server it starts or reuses (integration)."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import redis

from app.supervisor import StartError, Supervisor, WorkerProcess, settings_env, start_redis
from bench.stack import free_port


class Scripted(WorkerProcess):
    """A WorkerProcess whose process runs ``code`` instead of ``python -m app.worker``."""

    def __init__(self, code: str, name: str | None = None) -> None:
        nobody = f"redis://127.0.0.1:{free_port()}/0"  # no Redis answers there
        super().__init__([("dit-digits", "fp32")], dict(os.environ, REDIS_URL=nobody), name)
        self.code = code

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.code]


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_settings_env_names_variables_as_settings_reads_them():
    env = settings_env({"redis_url": "redis://r/0", "queue_max": 3, "api_keys": ["a", "b"]})
    assert env == {"REDIS_URL": "redis://r/0", "T2I_QUEUE_MAX": "3", "T2I_API_KEYS": "a,b"}
    assert settings_env({"device": None}) == {}


def test_worker_command_is_the_worker_module_with_its_name_and_port():
    worker = WorkerProcess([("dit-digits", "w8a8")], {}, name="w1", metrics_port=0)
    assert worker.command()[1:] == [
        "-m",
        "app.worker",
        "--model",
        "dit-digits",
        "--variant",
        "w8a8",
        "--name",
        "w1",
        "--metrics-port",
        "0",
    ]
    assert "--metrics-port" not in WorkerProcess([("dit-digits", "fp32")], {}).command()
    several = WorkerProcess([("dit-digits", "fp32"), ("t2i-digits", "w8a8")], {}, name="w2")
    assert several.command()[3:] == [
        "--serve",
        "dit-digits/fp32",
        "t2i-digits/w8a8",
        "--name",
        "w2",
    ]
    registry = WorkerProcess([("dit-digits", "fp32")], {}, name="w3", worker="cpu")
    assert registry.command()[3:] == ["--worker", "cpu", "--name", "w3"]


def test_waiting_fails_at_once_with_the_exit_code_of_a_dead_worker():
    worker = Scripted("import sys; sys.exit(3)").start()
    began = time.monotonic()
    with pytest.raises(StartError, match="exited with 3"):
        worker.wait_ready(timeout=60)
    assert time.monotonic() - began < 10


def test_stop_is_sigterm_then_sigkill(tmp_path):
    polite = Scripted("import time; time.sleep(60)").start()
    assert polite.stop(timeout=10) == -15
    ready = tmp_path / "ignoring"
    stubborn = Scripted(
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    ).start()
    _until(ready.exists)
    assert stubborn.stop(timeout=0.5) == -9


def test_crashed_workers_are_restarted_until_stop_and_clean_exits_are_not():
    crashing = Scripted("import sys; sys.exit(3)")
    named = Scripted("import sys; sys.exit(4)", name="fixed")
    clean = Scripted("pass")
    supervisor = Supervisor([crashing, named, clean], restart_delay_s=0.05, watch_every_s=0.05)
    supervisor.start()
    first_name, clean_process = crashing.name, clean.process
    try:
        _until(lambda: supervisor.restarts >= 4)
        assert clean.process is clean_process  # exit code 0: it was asked to stop
        assert crashing.name != first_name  # each start of an unnamed worker: a fresh name
        assert named.name == "fixed"
    finally:
        supervisor.stop(timeout=5)
    restarts = supervisor.restarts
    time.sleep(0.3)
    assert supervisor.restarts == restarts


def test_the_unit_tier_refuses_to_start_a_redis_server(tmp_path):
    with pytest.raises(RuntimeError, match="unit tier starts no redis-server"):
        start_redis(free_port(), tmp_path)


@pytest.mark.integration
def test_redis_is_started_with_persistence_reused_and_stopped(tmp_path):
    port = free_port()
    ours = start_redis(port, tmp_path / "data", append_only=True)
    try:
        client = redis.Redis.from_url(ours.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("save") == {"save": ""}
        found = start_redis(port, tmp_path / "elsewhere")
        assert found.process is None and found.url == ours.url
        found.stop()  # not ours to stop
        assert client.ping()
    finally:
        ours.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(ours.url, socket_connect_timeout=1).ping()


@pytest.mark.integration
def test_redis_that_cannot_start_fails_at_once_with_its_exit_code(tmp_path):
    with socket.socket() as taken:  # a port that answers, but not as Redis
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        began = time.monotonic()
        with pytest.raises(StartError, match="exited with"):
            start_redis(taken.getsockname()[1], tmp_path)
    assert time.monotonic() - began < 5
