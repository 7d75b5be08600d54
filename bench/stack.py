"""Start the service's parts for a benchmark: a redis-server, workers, the API (uvicorn)."""

from __future__ import annotations

import json
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

from app.queue.keys import Keys

__all__ = ["Stack", "free_port", "start_prometheus", "wait_for"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    """Until ``predicate()`` is true (its errors count as not yet), or RuntimeError."""
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
        wait_for(self.redis.ping, 10, "redis-server")
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

        wait_for(lambda: httpx.get(f"{self.url}/healthz").status_code == 200, 30, "the API")
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
        started = time.time()
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
            key = Keys(self.prefix).workers(model, variant)
            # a heartbeat of this process, not one left by a killed worker of the same name
            wait_for(lambda: (self.redis.zscore(key, name) or 0) >= started, 180, f"worker {name}")

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


def start_prometheus(
    folder: Path, targets: dict[str, list[str]], interval: str, rules: list[str] = ()
) -> tuple[subprocess.Popen, str]:
    """Debian's prometheus scraping ``targets`` (job name -> "host:port" list) every
    ``interval``, data in ``folder``; its process and its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("no prometheus on PATH (apt-get install prometheus)")
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": list(rules),
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": hosts}]}
            for job, hosts in targets.items()
        ],
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"http://127.0.0.1:{port}"
