"""``python -m app``: Redis (when REDIS_URL is unset), the registry's workers, the API.

On a fresh machine this is the whole service on 127.0.0.1:8000. Redis is a ``redis-server``
from PATH, with append-only persistence under ``T2I_DATA_DIR`` so queued jobs survive a
restart; an already running one on the port is reused. A worker process hosts many variants
(the registry's ``[workers.NAME]``; by default one per device, with every variant there).
Workers that die are restarted (their jobs wait for them, or are taken over by other workers
of the same variants). Ctrl-C stops everything in order. The processes
themselves are app.supervisor's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from app.config import get_settings
from app.registry import load_registry
from app.supervisor import StartError, Supervisor, WorkerProcess, start_redis

log = logging.getLogger("app.run")


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
    targets = registry.served()
    if args.only:
        unknown = set(args.only) - {f"{m}/{v}" for m, v in targets}
        if unknown:
            parser.error(f"not in the registry: {', '.join(sorted(unknown))}")
    hosts = {}
    for name, hosted in registry.workers.items():
        chosen = [t for t in hosted.variants if not args.only or f"{t[0]}/{t[1]}" in args.only]
        if chosen:
            hosts[name] = (chosen, hosted)
    env = dict(os.environ)
    redis_server = None
    if "REDIS_URL" not in os.environ:
        try:
            redis_server = start_redis(args.redis_port, args.data_dir / "redis", append_only=True)
        except StartError as exc:
            sys.exit(f"{exc}; or point REDIS_URL at a running Redis")
        env["REDIS_URL"] = os.environ["REDIS_URL"] = redis_server.url
        get_settings.cache_clear()
    # Share the cores: several workers each with all the cores' threads thrash a small machine.
    env.setdefault("T2I_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // len(hosts))))
    first_port = args.workers_metrics_port
    processes = []
    for i, (name, (chosen, hosted)) in enumerate(hosts.items()):
        port = first_port + i if first_port else None
        if chosen == list(hosted.variants):  # the registry's worker, budget and pins included
            processes.append(WorkerProcess(chosen, env, metrics_port=port, worker=name))
        else:
            processes.append(WorkerProcess(chosen, env, metrics_port=port))
    workers = Supervisor(processes).start()
    log.info(
        "API on http://%s:%d (workers: %s)",
        args.host,
        args.port,
        "; ".join(str(w) for w in processes),
    )
    try:
        uvicorn.run(
            "app.main:create_app", factory=True, host=args.host, port=args.port, log_level="info"
        )
    finally:
        workers.stop()
        if redis_server is not None:
            redis_server.stop()
    return 0
