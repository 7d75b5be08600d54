"""The API process's shared stream reader against a real redis-server: positions, no
duplicates, a key of another type, and wake-up latency."""

from __future__ import annotations

import asyncio
import time
import uuid

from redis import asyncio as aioredis

from app.config import Settings
from app.queue.connect import listener_client
from app.queue.keys import Keys
from app.queue.listener import Listener


def _run(redis_url: str, scenario) -> object:
    async def main():
        keys = Keys(f"test-{uuid.uuid4().hex[:8]}")
        client = aioredis.Redis.from_url(redis_url)
        reader = listener_client(Settings(redis_url=redis_url), 5.0)
        listener = Listener(reader, client, keys, block_s=5.0)
        listener.start()
        try:
            return await scenario(client, listener, keys)
        finally:
            await listener.close()
            await client.aclose()

    return asyncio.run(main())


def test_each_subscription_gets_what_follows_its_own_position(redis_url):
    async def scenario(client, listener, keys):
        stream = keys.events("a" * 32)
        first = (await client.xadd(stream, {"n": 1})).decode()
        await client.xadd(stream, {"n": 2})
        async with (
            listener.follow(stream, "0-0") as from_start,
            listener.follow(stream, first) as after_first,
        ):
            early = await from_start.next(5), await after_first.next(5)
            await client.xadd(stream, {"n": 3})
            late = await from_start.next(5), await after_first.next(5)
            nothing = await from_start.next(0.5)
        return early, late, nothing, listener.followed

    early, late, nothing, followed = _run(redis_url, scenario)
    assert [e[1]["n"] for e in early[0]] == ["1", "2"]
    assert [e[1]["n"] for e in early[1]] == ["2"]
    assert [[e[1]["n"] for e in batch] for batch in late] == [["3"], ["3"]]
    assert nothing == [] and followed == 0  # no duplicates; unfollowed on leaving


def test_a_key_of_another_type_is_dropped_and_the_others_go_on(redis_url):
    async def scenario(client, listener, keys):
        good, bad = keys.events("b" * 32), keys.job("c" * 32)
        await client.hset(bad, "status", "queued")  # a hash, not a stream
        async with listener.follow(bad) as wrong, listener.follow(good) as right:
            await asyncio.sleep(0.3)
            await client.xadd(good, {"n": 1})
            return await right.next(5), await wrong.next(0.5)

    got, wrong = _run(redis_url, scenario)
    assert [e[1]["n"] for e in got] == ["1"] and wrong == []


def test_a_new_subscription_is_read_at_once_not_at_the_next_block_timeout(redis_url):
    async def scenario(client, listener, keys):
        await asyncio.sleep(0.3)  # the listener is blocked in XREAD (5 s) on nothing
        stream = keys.done("d" * 32)
        await client.xadd(stream, {"status": "completed"})
        t0 = time.monotonic()
        async with listener.follow(stream) as done:
            entries = await done.next(5)
        return entries, time.monotonic() - t0

    entries, waited = _run(redis_url, scenario)
    assert entries and waited < 1.0
