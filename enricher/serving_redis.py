"""Served states in Redis (``serving.store: redis``), read by every worker without routing.

One hash per key, written by ``lua/serve_put.lua`` (compare with the stored input offset, set,
renew the TTL)::

    enricher:<app_id>:served:{<key>}   topic, partition, offset, value     serving.redis_ttl

The hash tag is the event key, not the app id: single-key commands need no shared slot, and
on a Redis Cluster the served state spreads over every node instead of filling one.

Stores of events that finish together share a round trip: ``put`` queues its script call, and
one flusher sends whatever is queued as one pipeline, then the next batch (at most one round
trip in flight; never more than one per event).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions

from .errors import ServiceUnavailable
from .quota import load_script
from .serving import Served

__all__ = ["RedisEnrichments", "served_key"]

_PUT: Final = load_script("serve_put.lua")
_PUT_SHA: Final = hashlib.sha1(_PUT.encode()).hexdigest()
_FAILURES: Final = (redis.exceptions.RedisError, OSError, TimeoutError)


def served_key(app_id: str, key: bytes) -> bytes:
    """The Redis key of an event key's served state."""
    return b"enricher:" + app_id.encode() + b":served:{" + key + b"}"


class RedisEnrichments:
    """The :class:`~enricher.serving.EnrichmentStore` in Redis. ``redis`` is owned (closed by
    :meth:`close`): serving reads never queue behind the limiter's round trips."""

    def __init__(self, redis: aioredis.Redis, *, app_id: str, ttl: float) -> None:
        self._redis = redis
        self._app_id = app_id
        self._ttl_ms = max(1, round(ttl * 1000))
        self._queued: list[tuple[bytes, Served, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def put(self, key: bytes, served: Served) -> None:
        done = asyncio.get_running_loop().create_future()
        self._queued.append((key, served, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the events finishing in this turn of the loop queue up
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                await self._send(batch)
            except ServiceUnavailable as exc:
                _settle(batch, exc)
            else:
                _settle(batch, None)

    async def _send(self, batch: list[tuple[bytes, Served, asyncio.Future[None]]]) -> None:
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            for key, served, _ in batch:
                args = (served.topic, served.partition, served.offset, served.value, self._ttl_ms)
                pipe.evalsha(_PUT_SHA, 1, served_key(self._app_id, key), *args)
            try:
                await self._run(pipe.execute())
                return
            except ServiceUnavailable as exc:
                if attempt == 2 or not isinstance(exc.__cause__, redis.exceptions.NoScriptError):
                    raise
                await self._run(self._redis.script_load(_PUT))  # first use, or Redis restarted

    async def get(self, key: bytes) -> Served | None:
        fields = ("topic", "partition", "offset", "value")
        topic, partition, offset, value = await self._run(
            self._redis.hmget(served_key(self._app_id, key), fields)
        )
        if topic is None or value is None:
            return None
        return Served(_text(topic), int(partition), int(offset), bytes(value))

    async def close(self) -> None:
        await self._redis.aclose()

    async def _run(self, command: Any) -> Any:
        try:
            return await command
        except _FAILURES as exc:
            raise ServiceUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _settle(
    batch: list[tuple[bytes, Served, asyncio.Future[None]]], error: Exception | None
) -> None:
    for _, _, done in batch:
        if done.done():  # its event was cancelled (shutdown)
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
