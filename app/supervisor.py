"""The service's processes: a redis-server, ``python -m app.worker`` subprocesses, restarts.

One place for what ``python -m app``, the benchmarks (bench.stack) and the service tests all
do: start (or reuse) Redis, spawn workers, wait for their first heartbeat, restart the ones
that crash, stop them all. Torch-free: the workers import torch, this module never does.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import redis

from app.config import Settings
from app.queue.keys import Keys

__all__ = [
    "RedisServer",
    "StartError",
    "Supervisor",
    "WorkerProcess",
    "settings_env",
    "start_redis",
    "stop_processes",
]

log = logging.getLogger("app.supervisor")

REDIS_START_TIMEOUT_S = 10.0
WORKER_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
RESTART_DELAY_S = 2.0
WATCH_EVERY_S = 1.0


class StartError(RuntimeError):
    """A process did not come up: missing binary, early exit (with its code) or a timeout."""


def settings_env(settings: Mapping[str, object]) -> dict[str, str]:
    """Environment variables that give a process these settings (``redis_url`` -> REDIS_URL,
    ``name`` -> T2I_NAME, lists comma-separated, None left out), as Settings reads them."""
    env = {}
    for name, value in settings.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        env["REDIS_URL" if name == "redis_url" else f"T2I_{name.upper()}"] = str(value)
    return env


def stop_processes(processes: Iterable[subprocess.Popen], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to every running one, then SIGKILL to those still running after ``timeout``."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# --- Redis ------------------------------------------------------------------------------------


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisServer:
    """A redis-server on 127.0.0.1: ours (``process``) or one found running (``process`` None)."""

    def __init__(self, port: int, process: subprocess.Popen | None) -> None:
        self.port, self.process = port, process
        self.url = f"redis://127.0.0.1:{port}/0"

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the redis-server we started; one we reused is left running."""
        if self.process is not None:
            stop_processes([self.process], timeout)


def start_redis(
    port: int,
    data_dir: Path,
    *,
    append_only: bool = False,
    timeout: float = REDIS_START_TIMEOUT_S,
) -> RedisServer:
    """The redis-server answering on 127.0.0.1:port, started from PATH unless one answers
    there already. Data in ``data_dir``: append-only persistence (jobs survive a restart) or
    none at all (tests and benchmarks). StartError when it cannot be started."""
    url = f"redis://127.0.0.1:{port}/0"
    if _answers(url):
        log.info("using the Redis already running at %s", url)
        return RedisServer(port, None)
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartError("no redis-server on PATH (Debian: apt-get install redis-server)")
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)]
    command += ["--save", "", "--appendonly", "yes" if append_only else "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartError(f"redis-server on port {port} exited with {process.returncode}")
        if _answers(url):
            log.info("started redis-server at %s (data in %s)", url, data_dir)
            return RedisServer(port, process)
        time.sleep(0.1)
    stop_processes([process], 1.0)
    raise StartError(f"redis-server did not answer on port {port} within {timeout} s")


# --- workers ----------------------------------------------------------------------------------


def _default_name() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"  # what the worker picks itself


class WorkerProcess:
    """One ``python -m app.worker`` subprocess serving ``variants`` ((model, variant) pairs,
    on one device), with ``env`` as its whole environment. Unnamed, it gets a fresh
    host-random name at every start. ``memory_budget``: the bytes of weights it may hold
    ("2GiB"; None: the registry's, else no limit). ``worker``: the registry's
    ``[workers.NAME]`` that lists ``variants`` (its budget and pins apply)."""

    def __init__(
        self,
        variants: Sequence[tuple[str, str]],
        env: Mapping[str, str],
        name: str | None = None,
        metrics_port: int | None = None,
        memory_budget: str | None = None,
        worker: str | None = None,
    ) -> None:
        if not variants:
            raise ValueError("a worker serves at least one variant")
        self.variants, self.env = list(variants), dict(env)
        self.fixed_name, self.metrics_port = name, metrics_port
        self.memory_budget, self.worker = memory_budget, worker
        self.name = name or _default_name()
        self.process: subprocess.Popen | None = None
        self.started = 0.0  # unix time of the latest start: heartbeats older than it are stale

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(f'{m}/{v}' for m, v in self.variants)})"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "app.worker"]
        if self.worker is not None:
            command += ["--worker", self.worker]
        elif len(self.variants) == 1:
            ((model, variant),) = self.variants
            command += ["--model", model, "--variant", variant]
        else:
            command += ["--serve", *(f"{m}/{v}" for m, v in self.variants)]
        command += ["--name", self.name]
        if self.memory_budget is not None:
            command += ["--memory-budget", self.memory_budget]
        if self.metrics_port is not None:
            command += ["--metrics-port", str(self.metrics_port)]
        return command

    def start(self) -> WorkerProcess:
        """Spawns the process (a fresh one, with a fresh name unless it was given one)."""
        self.name = self.fixed_name or _default_name()
        self.started = time.time()
        self.process = subprocess.Popen(self.command(), env=self.env)
        return self

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> WorkerProcess:
        """Until a heartbeat of this very process is in Redis (its score in its variants'
        worker sets is at least the start time: it heartbeats once it has loaded what it
        loads at start); StartError at once if the process exits."""
        url = self.env.get("REDIS_URL", Settings.model_fields["redis_url"].default)
        prefix = self.env.get("T2I_KEY_PREFIX", Settings.model_fields["key_prefix"].default)
        key = Keys(prefix).workers(*self.variants[0])
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise StartError(
                        f"worker {self} exited with {self.process.returncode} "
                        "before its first heartbeat"
                    )
                try:
                    beat = client.zscore(key, self.name)
                except redis.RedisError:
                    beat = None  # Redis not there yet: the worker waits for it as well
                if beat is not None and beat >= self.started:
                    return self
                time.sleep(0.2)
        finally:
            client.close()
        raise StartError(f"worker {self.name} sent no heartbeat within {timeout} s")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (it finishes its job and leaves), SIGKILL after ``timeout``; the exit code."""
        stop_processes([self.process], timeout)
        return self.process.returncode

    def kill(self) -> int:
        """SIGKILL, as a crash would; the exit code."""
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(10)


class Supervisor:
    """Workers kept running: one that exits with a code other than 0 (a crash; 0 is a
    requested stop) is started again after ``restart_delay_s``, until ``stop()``."""

    def __init__(
        self,
        workers: Iterable[WorkerProcess],
        restart_delay_s: float = RESTART_DELAY_S,
        watch_every_s: float = WATCH_EVERY_S,
    ) -> None:
        self.workers = list(workers)
        self.restart_delay_s, self.watch_every_s = restart_delay_s, watch_every_s
        self.restarts = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # no restart once stop() has begun
        self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        for worker in self.workers:
            worker.start()
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self.stopping.wait(self.watch_every_s):
            for worker in self.workers:
                code = worker.process.poll()
                if code in (None, 0):
                    continue
                log.warning("worker %s exited with %s; restarting", worker, code)
                if self.stopping.wait(self.restart_delay_s):
                    return
                with self._lock:
                    if self.stopping.is_set():
                        return
                    worker.start()
                    self.restarts += 1

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """No more restarts; SIGTERM to every worker, SIGKILL to those left after ``timeout``."""
        with self._lock:
            self.stopping.set()
        stop_processes([w.process for w in self.workers if w.process is not None], timeout)
        if self._watcher.is_alive():
            self._watcher.join(self.watch_every_s + 1)
