"""Served states in Redis (``serving.store: redis``), read by every worker without routing.

One hash per key, written by ``lua/serve_put.lua`` (compare with the stored input offset, set,
renew the TTL)::

    enricher:<app_id>:served:{<key>}   topic, partition, offset, value     serving.redis_ttl

The hash tag is the event key, not the app id: single-key commands need no shared slot, and
on a Redis Cluster the served state spreads over every node instead of filling one.

Stores of events that finish together share a round trip: the puts go through a
:class:`~enricher.script_batch.ScriptBatcher`, like the limiter's decisions (never more than
one round trip per event).
"""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions

from .errors import ServiceUnavailable
from .quota import load_script, text
from .script_batch import ScriptBatcher
from .serving import Served

__all__ = ["RedisEnrichments", "served_key"]

_FAILURES: Final = (redis.exceptions.RedisError, OSError, TimeoutError)


def served_key(app_id: str, key: bytes) -> bytes:
    """The Redis key of an event key's served state."""
    return b"enricher:" + app_id.encode() + b":served:{" + key + b"}"


class RedisEnrichments:
    """The :class:`~enricher.serving.EnrichmentStore` in Redis. ``redis`` is owned (closed by
    :meth:`close`): serving reads never queue behind the limiter's round trips."""

    def __init__(
        self, redis: aioredis.Redis, *, app_id: str, ttl: float, timeout: float = 2.0
    ) -> None:
        self._redis = redis
        self._app_id = app_id
        self._ttl_ms = max(1, round(ttl * 1000))
        self._puts = ScriptBatcher(redis, load_script("serve_put.lua"), timeout=timeout)

    async def put(self, key: bytes, served: Served) -> None:
        args = (served.topic, served.partition, served.offset, served.value, self._ttl_ms)
        await self._run(self._puts.call((served_key(self._app_id, key),), args))

    async def get(self, key: bytes) -> Served | None:
        fields = ("topic", "partition", "offset", "value")
        topic, partition, offset, value = await self._run(
            self._redis.hmget(served_key(self._app_id, key), fields)
        )
        if topic is None or value is None:
            return None
        return Served(text(topic), int(partition), int(offset), bytes(value))

    async def close(self) -> None:
        await self._puts.close()
        await self._redis.aclose()

    async def _run(self, command: Any) -> Any:
        try:
            return await command
        except _FAILURES as exc:
            raise ServiceUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc
