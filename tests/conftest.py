"""Test tiers. ``integration``: the tests that need a real redis-server (every test that uses
the ``redis_url`` or ``registry_file`` fixture, marked here), workers, a browser or a Prometheus
server, plus the ``slow`` ones that train or run models for long; the rest is the unit tier
(``make test-unit``).
A unit-tier test that tries to start a redis-server or a worker fails: see ``_no_services``.
"""

import itertools
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# layer timings of recipes priced by latency: never into the user's cache
os.environ.setdefault(
    "T2I_LATENCY_CACHE", str(Path(tempfile.mkdtemp(prefix="t2i-latency-")) / "latency.json")
)

# the session's real redis-server, and the registry the service tests' workers serve
INTEGRATION_FIXTURES = {"redis_url", "registry_file"}
# Marked slow here: it trains every embedded model (~15 s), a quarter of the unit tier's time.
SLOW_FILES = ("tests/test_recipe.py",)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects on the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW_FILES):
            item.add_marker(pytest.mark.slow)
        uses_service = INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses_service or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)


def _is_service(args) -> bool:
    """Whether a command line starts a redis-server, a worker or the whole service."""
    argv = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    if argv and Path(argv[0]).name == "redis-server":
        return True
    return any(a == "-m" and b in ("app", "app.worker") for a, b in itertools.pairwise(argv))


@pytest.fixture(autouse=True)
def _no_services(request, monkeypatch):
    """In a unit-tier test, starting a redis-server or a worker process is an error."""
    if request.node.get_closest_marker("integration"):
        return

    class UnitTierPopen(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            if _is_service(args):
                raise RuntimeError(
                    f"the unit tier starts no redis-server and no worker ({args!r}): "
                    "mark the test integration or use the redis_url fixture"
                )
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", UnitTierPopen)
