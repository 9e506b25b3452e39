"""Worker heartbeats in Redis: what ``enricher status`` reads to see the workers alive.

    key                                      value                                  TTL
    enricher:{<app_id>}:worker:<worker id>   hash: worker, started_at, last_beat,    10 s, renewed
                                             web_url, and JSON fields partitions,    every 2 s
                                             in_flight, apis, cache, pipelines
    enricher:{<app_id>}:workers              sorted set of worker ids, scored by     1 day
                                             their last beat (Unix time)

The worker id is ``host:pid:web_port``. A worker that stops cleanly deletes its hash at once; one
that dies disappears when its hash expires. ``partitions``, ``apis`` and the others are the
sections of :meth:`enricher.monitor.WorkerMonitor.snapshot`. When Redis cannot be reached the
beats are skipped (one warning per outage): a heartbeat never holds up the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions

from .monitor import WorkerMonitor
from .quota import REDIS_ERRORS, text

__all__ = [
    "BEAT_EVERY",
    "BEAT_TTL",
    "Heartbeat",
    "index_key",
    "read_heartbeats",
    "worker_key",
]

log = logging.getLogger("enricher.heartbeat")

BEAT_EVERY: Final = 2.0  # seconds between beats
BEAT_TTL: Final = 10  # seconds a beat is kept: a worker missing 4 beats is no longer alive
QUOTAS_EVERY: Final = 4.0  # seconds between quota readings for the metrics
_JSON_FIELDS: Final = ("partitions", "in_flight", "apis", "cache", "pipelines")
_FAILURES: Final = (*REDIS_ERRORS, redis.exceptions.RedisError, TimeoutError)


def worker_key(app_id: str, worker: str) -> str:
    return f"enricher:{{{app_id}}}:worker:{worker}"


def index_key(app_id: str) -> str:
    return f"enricher:{{{app_id}}}:workers"


def beat_fields(snapshot: dict[str, Any], now: float) -> dict[str, str]:
    """The hash fields of one beat."""
    fields = {
        "worker": str(snapshot["worker"]),
        "started_at": repr(float(snapshot["started_at"])),
        "last_beat": repr(now),
        "web_url": str(snapshot["web_url"]),
    }
    for name in _JSON_FIELDS:
        fields[name] = json.dumps(snapshot.get(name), separators=(",", ":"))
    return fields


def parse_beat(raw: dict[Any, Any]) -> dict[str, Any] | None:
    """A beat's hash as a dict (JSON fields decoded); None when it is not a whole beat."""
    fields = {text(k): text(v) for k, v in raw.items()}
    try:
        beat: dict[str, Any] = {
            "worker": fields["worker"],
            "started_at": float(fields["started_at"]),
            "last_beat": float(fields["last_beat"]),
            "web_url": fields.get("web_url", ""),
        }
        for name in _JSON_FIELDS:
            beat[name] = json.loads(fields.get(name) or "null")
    except (KeyError, ValueError):
        return None
    return beat


async def read_heartbeats(client: aioredis.Redis, app_id: str) -> list[dict[str, Any]]:
    """The beats of the workers alive (unexpired hashes), by worker id. Raises Redis errors."""
    index = index_key(app_id)
    await client.zremrangebyscore(index, "-inf", time.time() - 3600)
    ids = [text(i) for i in await client.zrange(index, 0, -1)]
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for worker in ids:
        pipe.hgetall(worker_key(app_id, worker))
    found = await pipe.execute()
    beats = [beat for raw in found if raw and (beat := parse_beat(raw)) is not None]
    return sorted(beats, key=lambda b: str(b["worker"]))


class Heartbeat:
    """Writes the monitor's snapshot to Redis every :data:`BEAT_EVERY` seconds."""

    def __init__(
        self,
        monitor: WorkerMonitor,
        client: aioredis.Redis,
        *,
        every: float = BEAT_EVERY,
        ttl: int = BEAT_TTL,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._monitor = monitor
        self._redis = client
        self._every = every
        self._ttl = ttl
        self._wall = wall
        self._key = worker_key(monitor.config.app_id, monitor.worker)
        self._index = index_key(monitor.config.app_id)
        self._task: asyncio.Task[None] | None = None
        self._down = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="enricher-heartbeat")

    async def _run(self) -> None:
        next_quotas = 0.0
        while True:
            try:
                if time.monotonic() >= next_quotas:
                    next_quotas = time.monotonic() + QUOTAS_EVERY
                    async with asyncio.timeout(self._every):
                        await self._monitor.refresh_quotas()
                runtime = self._monitor.runtime
                if runtime is not None:
                    runtime.stats.sample()
                await self.beat()
            except TimeoutError:
                pass
            except Exception:  # a bug: say so, keep beating (status would call us dead)
                log.exception("heartbeat failed")
            await asyncio.sleep(self._every)

    async def beat(self) -> bool:
        """Write one beat; False (logged once per outage) when Redis cannot be reached."""
        now = self._wall()
        fields = beat_fields(self._monitor.snapshot(), now)
        try:
            async with asyncio.timeout(self._every):
                pipe = self._redis.pipeline(transaction=True)
                pipe.hset(self._key, mapping=fields)  # type: ignore[arg-type]
                pipe.expire(self._key, self._ttl)
                pipe.zadd(self._index, {self._monitor.worker: now})
                pipe.expire(self._index, 86_400)
                await pipe.execute()
        except _FAILURES as exc:
            if not self._down:
                self._down = True
                log.warning("heartbeats paused: Redis unavailable (%s)", type(exc).__name__)
            return False
        if self._down:
            self._down = False
            log.info("heartbeats resumed")
        return True

    async def close(self) -> None:
        """Stop beating and remove this worker's beat (best effort, within a second)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            async with asyncio.timeout(1.0):
                pipe = self._redis.pipeline(transaction=True)
                pipe.delete(self._key)
                pipe.zrem(self._index, self._monitor.worker)
                await pipe.execute()
        except _FAILURES:
            pass
