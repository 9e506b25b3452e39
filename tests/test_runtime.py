"""The worker's Redis client: more concurrent commands than its pool has connections wait."""

from __future__ import annotations

import asyncio
import time

from enricher.config import config_from_dict
from enricher.runtime import REDIS_CONNECTIONS, connect_redis
from enricher.services import EmbeddedRedis


async def test_commands_beyond_the_pool_wait_for_a_connection(redis_service: EmbeddedRedis) -> None:
    redis = connect_redis(config_from_dict({"redis": {"url": redis_service.url}}))
    try:
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
