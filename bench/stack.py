"""Start the service's parts for a benchmark: a redis-server, workers, the API (uvicorn)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

__all__ = ["Stack", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {timeout} s")


class Stack:
    """redis-server + API + named workers, all subprocesses, torn down by ``close()``."""

    def __init__(self, **settings: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("no redis-server on PATH (apt-get install redis-server)")
        self.folder = Path(tempfile.mkdtemp(prefix="t2i-bench-"))
        redis_port, self.api_port = free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.env = dict(
            os.environ,
            REDIS_URL=self.redis_url,
            HF_HUB_OFFLINE="1",
            T2I_KEY_PREFIX=f"bench-{uuid.uuid4().hex[:6]}",
        )
        self.env.update({f"T2I_{k.upper()}": str(v) for k, v in settings.items()})
        self.redis_process = subprocess.Popen(
            [
                binary,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
        )
        self.redis = redis.Redis.from_url(self.redis_url)
        _wait(self.redis.ping, 10, "redis-server")
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "app.main:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--log-level",
                "warning",
            ],
            env=self.env,
        )
        import httpx

        _wait(lambda: httpx.get(f"{self.url}/healthz").status_code == 200, 30, "the API")
        self.workers: dict[str, subprocess.Popen] = {}
        self.prefix = self.env["T2I_KEY_PREFIX"]

    def start_worker(
        self,
        name: str,
        model: str,
        variant: str,
        wait: bool = True,
        metrics_port: int = 0,
        **settings: str,
    ) -> None:
        env = dict(self.env, **{f"T2I_{k.upper()}": str(v) for k, v in settings.items()})
        self.workers[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.worker",
                "--model",
                model,
                "--variant",
                variant,
                "--name",
                name,
                "--metrics-port",
                str(metrics_port),
            ],
            env=env,
        )
        if wait:
            key = f"{self.prefix}:workers:{model}:{variant}"
            _wait(lambda: self.redis.zscore(key, name) is not None, 180, f"worker {name}")

    def stop_worker(self, name: str) -> None:
        self.workers[name].terminate()
        self.workers[name].wait(60)

    def kill_worker(self, name: str) -> None:
        self.workers[name].send_signal(signal.SIGKILL)
        self.workers[name].wait(10)

    def close(self) -> None:
        for process in [*self.workers.values(), self.api]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.workers.values(), self.api]:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.redis_process.terminate()
        self.redis_process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)
