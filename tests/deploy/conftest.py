from pathlib import Path

# The session's redis-server and test registry, shared with the service tests.
from tests.service.conftest import redis_url, registry_file  # noqa: F401

COMPOSE_TESTS = Path(__file__).resolve().parent / "compose"


def pytest_ignore_collect(collection_path: Path, config):
    """tests/deploy/compose needs the compose stack (make test-deploy names the folder): no
    tier of make test collects it."""
    if collection_path.resolve() == COMPOSE_TESTS:
        named = (Path(a.split("::")[0]).resolve() for a in config.args)
        return not any(p == COMPOSE_TESTS or COMPOSE_TESTS in p.parents for p in named)
    return None
