"""``python -m app``: Redis (when REDIS_URL is unset), a worker per registry variant, the API.

On a fresh machine this is the whole service on 127.0.0.1:8000. Redis is a ``redis-server``
from PATH, with append-only persistence under ``T2I_DATA_DIR`` so queued jobs survive a
restart; an already running one on the port is reused. Workers that die are restarted (their
jobs are taken over by the others meanwhile). Ctrl-C stops everything in order.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis
import uvicorn

from app.config import get_settings
from app.registry import load_registry

log = logging.getLogger("app.run")

RESTART_DELAY_S = 2.0


def start_redis(port: int, data_dir: Path) -> subprocess.Popen | None:
    """A redis-server on 127.0.0.1:port, unless one answers there already."""
    url = f"redis://127.0.0.1:{port}/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        log.info("using the Redis already running at %s", url)
        return None
    except redis.RedisError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(
            "no redis-server on PATH: install it (Debian: apt-get install redis-server) "
            "or point REDIS_URL at a running Redis"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
            log.info("started redis-server at %s (data in %s)", url, data_dir)
            return process
        except redis.RedisError:
            time.sleep(0.1)
    process.kill()
    sys.exit(f"redis-server did not answer on port {port} within 10 s")


class Workers:
    """Worker subprocesses, restarted when they die until ``stop()``."""

    def __init__(self, targets: list[tuple[str, str]], env: dict[str, str], first_port: int):
        self.targets, self.env, self.first_port = targets, env, first_port
        self.processes: dict[int, subprocess.Popen] = {}
        self.stopping = threading.Event()

    def _spawn(self, i: int) -> None:
        model, variant = self.targets[i]
        command = [sys.executable, "-m", "app.worker", "--model", model, "--variant", variant]
        if self.first_port:
            command += ["--metrics-port", str(self.first_port + i)]
        self.processes[i] = subprocess.Popen(command, env=self.env)

    def start(self) -> None:
        for i in range(len(self.targets)):
            self._spawn(i)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            for i, process in list(self.processes.items()):
                # exit code 0: it was asked to stop (Ctrl-C reaches the whole process group)
                if process.poll() not in (None, 0) and not self.stopping.is_set():
                    model, variant = self.targets[i]
                    log.warning(
                        "worker %s/%s exited (%s); restarting", model, variant, process.returncode
                    )
                    time.sleep(RESTART_DELAY_S)
                    self._spawn(i)

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("T2I_DATA_DIR", ".run"))
    )
    parser.add_argument(
        "--workers-metrics-port",
        type=int,
        default=9101,
        help="the first worker's metrics port; the others count up (0: none)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        metavar="MODEL/VARIANT",
        help="serve only these variants (default: every registry variant)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    registry = load_registry(settings.registry)
    targets = [(m, v) for m, spec in registry.models.items() for v in spec.variants]
    if args.only:
        unknown = set(args.only) - {f"{m}/{v}" for m, v in targets}
        if unknown:
            parser.error(f"not in the registry: {', '.join(sorted(unknown))}")
        targets = [t for t in targets if f"{t[0]}/{t[1]}" in args.only]
    env = dict(os.environ)
    redis_process = None
    if "REDIS_URL" not in os.environ:
        redis_process = start_redis(args.redis_port, args.data_dir / "redis")
        env["REDIS_URL"] = f"redis://127.0.0.1:{args.redis_port}/0"
        os.environ["REDIS_URL"] = env["REDIS_URL"]
        get_settings.cache_clear()
    # Share the cores: many workers each with all the cores' threads thrash a small machine.
    env.setdefault("T2I_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // len(targets))))
    workers = Workers(targets, env, args.workers_metrics_port)
    workers.start()
    log.info(
        "API on http://%s:%d (workers: %s)",
        args.host,
        args.port,
        ", ".join(f"{m}/{v}" for m, v in targets),
    )
    try:
        uvicorn.run(
            "app.main:create_app", factory=True, host=args.host, port=args.port, log_level="info"
        )
    finally:
        workers.stop()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(10)
    return 0
