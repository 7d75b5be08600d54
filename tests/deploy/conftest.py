# The session's redis-server and test registry, shared with the service tests.
from tests.service.conftest import redis_url, registry_file  # noqa: F401
