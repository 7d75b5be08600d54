"""Every Redis client of the service is built here, with its timeouts and its retry policy.

- Ordinary calls (the API's routes, a worker's writes) time out after ``redis_timeout_s``: a
  stalled Redis becomes an error the caller handles instead of a request hanging for good.
- Blocking reads (``XREAD BLOCK``, ``XREADGROUP BLOCK``) get a socket timeout of their block
  time plus ``redis_timeout_s``, so a quiet stream is never mistaken for a stalled Redis.
- A call is retried only after a ``ConnectionError`` (a pooled connection found dead, as after
  a Redis restart), never after a timeout: a timed-out call may still run once Redis wakes,
  and running a queue script twice would queue or start a job twice.
"""

from __future__ import annotations

import redis
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from app.config import Settings

__all__ = ["api_client", "listener_client", "worker_client"]

_RETRIES = 2


def api_client(settings: Settings) -> aioredis.Redis:
    """The API's pool for ordinary calls. A burst waits up to ``redis_timeout_s`` for a free
    connection rather than failing; nothing long-lived holds one (see ``app.queue.listener``)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=AsyncRetry(ExponentialBackoff(cap=0.5), _RETRIES, (RedisConnectionError,)),
    )
    return aioredis.Redis(connection_pool=pool)


def listener_client(settings: Settings, block_s: float) -> aioredis.Redis:
    """One connection for the API process's shared ``XREAD BLOCK`` of job streams."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        single_connection_client=True,
        socket_timeout=block_s + settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=AsyncRetry(ExponentialBackoff(cap=0.5), _RETRIES, (RedisConnectionError,)),
    )


def worker_client(settings: Settings, block_s: float) -> redis.Redis:
    """A worker's client: its longest blocking call (taking jobs) waits ``block_s``."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=block_s + settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5), _RETRIES, (RedisConnectionError,)),
    )
