"""The worker's Redis client: more concurrent commands than its pool has connections wait."""

from __future__ import annotations

import asyncio
import time

from redis import asyncio as aioredis

from enricher.config import config_from_dict
from enricher.runtime import REDIS_CONNECTIONS, connect_redis
from enricher.services import EmbeddedRedis


async def test_commands_beyond_the_pool_wait_for_a_connection(redis_service: EmbeddedRedis) -> None:
    redis = connect_redis(config_from_dict({"redis": {"url": redis_service.url}}))
    try:
        await _open_every_connection(redis)
        many = REDIS_CONNECTIONS + 50  # each holds its connection for 0.2 s
        started = time.monotonic()
        results = await asyncio.gather(
            *(redis.blpop([f"empty-{i}"], timeout=0.2) for i in range(many))
        )
        elapsed = time.monotonic() - started
    finally:
        await redis.aclose()
    assert results == [None] * many  # none failed with "too many connections"
    assert 0.4 <= elapsed < 2.0  # the last 50 waited for a connection, then ran


async def _open_every_connection(redis: aioredis.Redis) -> None:
    """Connect the whole pool first, one connection at a time: what is measured is the wait for
    a free connection, not a burst of connects (on a loaded machine, 100 at once can take longer
    than the 2 s connect timeout)."""
    pool = redis.connection_pool
    connections = [await pool.get_connection() for _ in range(REDIS_CONNECTIONS)]
    for connection in connections:
        await pool.release(connection)
