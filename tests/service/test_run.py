"""``python -m app``: starts its own redis-server, the workers and the API; Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import redis

from tests.service.conftest import MODELS, free_port, wait_until

pytestmark = pytest.mark.integration  # its own redis-server and workers


def test_run_command_serves_and_stops(tmp_path):
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f'[models.dit-digits]\nsource = "{MODELS / "dit-digits"}"\n'
        '[models.dit-digits.variants.fp32]\ndtype = "fp32"\n'
    )
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(T2I_REGISTRY=str(registry), HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "--port",
            str(port),
            "--redis-port",
            str(redis_port),
            "--data-dir",
            str(tmp_path / "data"),
            "--workers-metrics-port",
            "0",
        ],
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 120, 0.5, what="python -m app to be ready")
        response = httpx.post(
            f"{url}/v1/images/generations",
            json={"model": "dit-digits", "prompt": "two", "steps": 4},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert (tmp_path / "data" / "redis").is_dir()  # its own Redis, persisting there
    finally:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert process.wait(60) == 0
    with pytest.raises(redis.ConnectionError):  # and its Redis is gone with it
        redis.Redis(port=redis_port, socket_connect_timeout=1).ping()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False
