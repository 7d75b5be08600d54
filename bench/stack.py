"""Start the service's parts for a benchmark: a redis-server, workers, the API (uvicorn).

Redis and the workers are app.supervisor's; this adds the API process and names workers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from app.supervisor import StartError, WorkerProcess, settings_env, start_redis, stop_processes

__all__ = ["Stack", "free_port", "start_prometheus", "wait_for"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    """``predicate()``'s first truthy value, polled every ``every`` s (its errors count as not
    yet); RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            pass
        time.sleep(every)
    raise RuntimeError(f"{what} did not come up within {timeout} s")


class Stack:
    """redis-server + API + named workers, all subprocesses, torn down by ``close()``."""

    def __init__(self, **settings: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="t2i-bench-"))
        try:
            self.redis_server = start_redis(free_port(), self.folder)
        except StartError as exc:
            sys.exit(str(exc))
        self.api_port = free_port()
        self.redis_url = self.redis_server.url
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.env = dict(
            os.environ,
            REDIS_URL=self.redis_url,
            HF_HUB_OFFLINE="1",
            T2I_KEY_PREFIX=f"bench-{uuid.uuid4().hex[:6]}",
        )
        self.env.update(settings_env(settings))
        self.redis = redis.Redis.from_url(self.redis_url)
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
        self.workers: dict[str, subprocess.Popen] = {}  # name -> its latest process
        self._workers: dict[str, WorkerProcess] = {}
        self.prefix = self.env["T2I_KEY_PREFIX"]

    def start_worker(
        self,
        name: str,
        model: str | None = None,
        variant: str | None = None,
        wait: bool = True,
        metrics_port: int = 0,
        serves: list[tuple[str, str]] | None = None,
        memory_budget: str | None = None,
        ready_s: float = 180,
        **settings: str,
    ) -> None:
        """Starts worker ``name`` for ``model``/``variant`` or for the variants ``serves``
        (settings on top of the stack's); ``wait``: until its first heartbeat (not one left by
        an earlier, killed worker of that name), at most ``ready_s``."""
        env = dict(self.env, **settings_env(settings))
        variants = serves or [(model, variant)]
        worker = WorkerProcess(
            variants, env, name=name, metrics_port=metrics_port, memory_budget=memory_budget
        ).start()
        self._workers[name], self.workers[name] = worker, worker.process
        if wait:
            worker.wait_ready(ready_s)

    def stop_worker(self, name: str) -> None:
        self._workers[name].stop(60)

    def kill_worker(self, name: str) -> None:
        self._workers[name].kill()

    def close(self) -> None:
        stop_processes([*self.workers.values(), self.api], 30)
        self.redis_server.stop()
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
