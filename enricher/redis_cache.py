"""The response cache in Redis, shared by every worker of one ``app_id`` (see :mod:`.cache`).

Redis keys (the limiter's hash tag, see :mod:`enricher.quota`, so they share its cluster slot)::

    <prefix>cache:<key>   {"body": <answer>} or {"status": 404}    cache_ttl / cache_not_found_ttl
    <prefix>lease:<key>   random token of the worker calling       lease, renewed while calling

Each step is one script in ``lua/``: ``cache_lookup.lua`` (the stored answer, else take the
lease), ``cache_finish.lua`` (store the answer, free the lease) and ``cache_renew.lua``.

When Redis is unreachable the cache steps aside: calls go to the API (one warning per outage,
probes backing off from 50 ms to 2 s). The cache never fails an event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions

from .cache import CachedApi, Call, Clock, _CacheBase, _stored_answer
from .errors import ServiceUnavailable
from .quota import Keys, load_script

__all__ = ["RedisResponseCache"]

log = logging.getLogger("enricher.cache")  # the cache's logger, wherever the class lives

POLL_MIN, POLL_MAX = 0.02, 0.2  # seconds between polls of a worker waiting on another's lease
PROBE_MIN, PROBE_MAX = 0.05, 2.0  # seconds between Redis probes during an outage
_REDIS_FAILURES: Final = (redis.exceptions.RedisError, OSError, TimeoutError)
_CONTAINS_BATCH = 1000

# Scripts: keys in KEYS[], numbers in ARGV[], times in milliseconds (see each file's header).
_LOOKUP: Final = load_script("cache_lookup.lua")
_FINISH: Final = load_script("cache_finish.lua")
_RENEW: Final = load_script("cache_renew.lua")


def _decode(raw: bytes | str) -> dict[str, Any] | None:
    """A stored entry, or None when it is not one of ours (then it is treated as a miss)."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if isinstance(entry, dict) and ("body" in entry or isinstance(entry.get("status"), int)):
        return entry
    return None


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisResponseCache(_CacheBase):
    """Answers shared through Redis by every worker of one ``app_id``.

    ``redis`` is owned by the caller (not closed here); ``lease`` is how long a dead holder's
    lease keeps other workers waiting; ``redis_timeout`` bounds each Redis round trip.
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        app_id: str,
        lease: float = 5.0,
        redis_timeout: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__()
        self._redis = redis
        self._app_id = app_id
        self._lease_ms = _ms(lease)
        self._timeout = redis_timeout
        self._clock = clock
        self._lookup = redis.register_script(_LOOKUP)
        self._finish = redis.register_script(_FINISH)
        self._renew = redis.register_script(_RENEW)
        self._down_since: float | None = None
        self._failures = 0
        self._next_probe = 0.0

    def keys(self, api_name: str, key: str) -> tuple[str, str]:
        """The cache and lease keys of request ``key``."""
        prefix = Keys.of(self._app_id, api_name).prefix
        return f"{prefix}cache:{key}", f"{prefix}lease:{key}"

    async def _fetch(self, api: CachedApi, key: str, call: Call) -> Any:
        keys = self.keys(api.name, key)
        token = secrets.token_hex(16)
        reply = await self._run(self._lookup(keys=keys, args=[token, self._lease_ms]))
        if reply is None:  # Redis unreachable: just call
            self.stats.calls += 1
            return await call()
        answer, leased = reply
        if answer is not None and (entry := _decode(answer)) is not None:
            self.stats.hits += 1
            return _stored_answer(api, entry)
        self.stats.misses += 1
        if answer is None and not leased:
            answer, leased = await self._wait(keys, token)
            if answer is not None and (entry := _decode(answer)) is not None:
                self.stats.waits += 1
                return _stored_answer(api, entry)
            if answer is None and not leased:  # Redis went away while we waited
                self.stats.calls += 1
                return await call()
        # Ours to call: the lease is ours, or a foreign value sits there (our answer replaces it).
        return await self._call_leased(api, keys, token, call)

    async def _wait(self, keys: tuple[str, str], token: str) -> tuple[Any, bool]:
        """Poll until the holder's answer is stored ``(answer, False)``, the lease is ours
        ``(None, True)`` (freed without an answer, or expired), or Redis fails ``(None, False)``."""
        delay = POLL_MIN
        while True:
            await asyncio.sleep(delay)
            delay = min(POLL_MAX, delay * 2)
            reply = await self._run(self._lookup(keys=keys, args=[token, self._lease_ms]))
            if reply is None:
                return None, False
            if reply[0] is not None or reply[1]:
                return reply[0], bool(reply[1])

    async def _call_leased(
        self, api: CachedApi, keys: tuple[str, str], token: str, call: Call
    ) -> Any:
        finished = False

        async def finish(payload: bytes | None, ttl: float) -> None:
            nonlocal finished
            finished = True
            await self._run(self._finish(keys=keys, args=[token, payload or b"", _ms(ttl)]))

        renewal = asyncio.create_task(self._keep_lease(keys[1], token))
        try:
            return await self._call_and_store(api, call, finish)
        finally:
            renewal.cancel()
            if not finished:  # cancelled or not a CallError: free the lease for the next worker
                await self._run(self._finish(keys=keys, args=[token, b"", 1]))

    async def _keep_lease(self, lease_key: str, token: str) -> None:
        """Renew the lease at a third of its length while our call runs."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            await self._run(self._renew(keys=[lease_key], args=[token, self._lease_ms]))

    async def _run(self, command: Awaitable[Any]) -> Any:
        """The command's reply, or None when Redis is unreachable (or known to be)."""
        if self._down_since is not None and self._clock() < self._next_probe:
            if asyncio.iscoroutine(command):
                command.close()  # never awaited: no "never awaited" warning
            return None
        try:
            async with asyncio.timeout(self._timeout):
                reply = await command
        except _REDIS_FAILURES as exc:
            self._failed(exc)
            return None
        if self._down_since is not None:
            log.warning(
                "response cache: Redis reachable again after %.1fs",
                self._clock() - self._down_since,
            )
            self._down_since, self._failures = None, 0
        return reply

    def _failed(self, exc: BaseException) -> None:
        now = self._clock()
        self._failures += 1
        self._next_probe = now + min(PROBE_MAX, PROBE_MIN * 2 ** (self._failures - 1))
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "response cache: Redis unavailable (%s: %s); calling APIs without the cache",
                type(exc).__name__,
                exc,
            )

    async def contains(self, api_name: str, keys: Sequence[str]) -> list[bool]:
        found: list[bool] = []
        try:
            for start in range(0, len(keys), _CONTAINS_BATCH):
                pipe = self._redis.pipeline(transaction=False)
                for key in keys[start : start + _CONTAINS_BATCH]:
                    pipe.exists(self.keys(api_name, key)[0])
                found.extend(bool(count) for count in await pipe.execute())
        except _REDIS_FAILURES as exc:
            raise ServiceUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc
        return found
