"""The shared response cache: one answer per canonical request, for every worker and replay.

    request_key(api, params)   sha256 of [api, method, URL with its query sorted, POST body]
    ResponseCache              get_or_call / contains / close
    ├── RedisResponseCache     shared by every worker of one app_id
    └── MemoryResponseCache    one process (logic tests, the dev stack)

``get_or_call`` for an API with ``cache_ttl`` or ``cache_not_found_ttl`` over 0 (else it only
calls):

1. single flight: concurrent identical keys in one process share one fetch;
2. a stored answer is returned; a stored "not found" is re-raised as a CallError (attempts 0);
3. on a miss (Redis) the fetch takes a lease; a worker finding the lease taken polls for the
   holder's answer (20 ms doubling to 200 ms) and takes the lease over when it is freed or expires.
   The holder renews its lease while its call runs (a limiter wait may be long), so only a dead
   holder's lease expires;
4. an answer is stored for ``cache_ttl``, a 404/410 for ``cache_not_found_ttl``; other errors and
   answers over ``max_response_bytes`` (as compact JSON) are never stored.

Redis keys (the limiter's hash tag, see :mod:`enricher.quota`, so they share its cluster slot)::

    <prefix>cache:<key>   {"body": <answer>} or {"status": 404}    cache_ttl / cache_not_found_ttl
    <prefix>lease:<key>   random token of the worker calling       lease, renewed while calling

When Redis is unreachable the cache steps aside: calls go to the API (one warning per outage,
probes backing off from 50 ms to 2 s). The cache never fails an event.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
import redis.exceptions

from .errors import CallError, InvalidEvent, ServiceUnavailable
from .quota import Keys
from .urls import UrlTemplate, param_to_str

__all__ = [
    "CacheStats",
    "CachedApi",
    "MemoryResponseCache",
    "RedisResponseCache",
    "ResponseCache",
    "caches",
    "render_url",
    "request_key",
    "request_key_of",
]

log = logging.getLogger("enricher.cache")

NOT_FOUND_STATUSES: Final = frozenset({404, 410})
POLL_MIN, POLL_MAX = 0.02, 0.2  # seconds between polls of a worker waiting on another's lease
PROBE_MIN, PROBE_MAX = 0.05, 2.0  # seconds between Redis probes during an outage
_REDIS_FAILURES: Final = (redis.exceptions.RedisError, OSError, TimeoutError)
_CONTAINS_BATCH = 1000

Call = Callable[[], Awaitable[Any]]
Clock = Callable[[], float]


class CachedApi(Protocol):
    """The fields of ``config.ApiSettings`` the cache reads."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def cache_ttl(self) -> float: ...
    @property
    def cache_not_found_ttl(self) -> float: ...
    @property
    def max_response_bytes(self) -> int: ...


class ResponseCache(Protocol):
    """What the caller and the dry-run planner need from a response cache."""

    async def get_or_call(self, api: CachedApi, key: str, call: Call) -> Any:
        """The answer to request ``key``: stored, another caller's, or ``await call()``."""

    async def contains(self, api_name: str, keys: Sequence[str]) -> list[bool]:
        """Whether each key has a stored answer (or not-found); ServiceUnavailable if unknown."""

    async def close(self) -> None:
        """Stop using the cache: later ``get_or_call``s only call."""


def caches(api: CachedApi) -> bool:
    """Whether anything of ``api`` is cached (else no key is computed, no Redis is touched)."""
    return api.cache_ttl > 0 or api.cache_not_found_ttl > 0


# --- keys ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _template(url: str) -> UrlTemplate:
    return UrlTemplate(url)


def render_url(api_name: str, template: UrlTemplate, params: Mapping[str, Any]) -> str:
    """The request URL; InvalidEvent (naming the placeholder, never the value) for bad params."""
    values: dict[str, str] = {}
    for name in template.placeholders:
        if name not in params:
            raise InvalidEvent(f"no value for URL placeholder {name}", api=api_name)
        try:
            values[name] = param_to_str(params[name])
        except ValueError as exc:  # our own message: it names the type, not the value
            raise InvalidEvent(f"URL placeholder {name}: {exc}", api=api_name) from None
    try:
        return template.render(values)
    except UnicodeError:
        raise InvalidEvent("a URL param is not valid Unicode", api=api_name) from None
    except ValueError as exc:  # our own messages: they name the placeholder, not the value
        raise InvalidEvent(f"bad URL param: {exc}", api=api_name) from None


def request_key(api: CachedApi, params: Mapping[str, Any]) -> str:
    """The cache key of calling ``api`` with ``params`` (InvalidEvent for unusable params)."""
    url = render_url(api.name, _template(api.url), params)
    return request_key_of(api.name, api.method, url, dict(params) if api.method == "POST" else None)


def request_key_of(api_name: str, method: str, url: str, body: Any) -> str:
    """sha256 hex of the canonical request: the query's items are sorted, and so are the keys of
    the JSON body, so equal requests share a key whatever the order of their params."""
    base, question, query = url.partition("?")
    canonical = base + question + "&".join(sorted(query.split("&"))) if query else base
    text = json.dumps([api_name, method, canonical, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --- stored values -------------------------------------------------------------------------


def _compact(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: keep it escaped
        return json.dumps(value, separators=(",", ":")).encode()


def _answer_entry(api: CachedApi, value: Any) -> tuple[bytes | None, float]:
    """What to store for a successful answer, and for how long (None: nothing)."""
    if api.cache_ttl <= 0:
        return None, 0.0
    payload = _compact({"body": value})
    if len(payload) > api.max_response_bytes:
        return None, 0.0
    return payload, api.cache_ttl


def _error_entry(api: CachedApi, exc: CallError) -> tuple[bytes | None, float]:
    """What to store for a failed call: only a 404/410 with a not-found TTL."""
    not_found = exc.kind == "http_status" and exc.status in NOT_FOUND_STATUSES
    if not not_found or api.cache_not_found_ttl <= 0:
        return None, 0.0
    return _compact({"status": exc.status}), api.cache_not_found_ttl


def _decode(raw: bytes | str) -> dict[str, Any] | None:
    """A stored entry, or None when it is not one of ours (then it is treated as a miss)."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if isinstance(entry, dict) and ("body" in entry or isinstance(entry.get("status"), int)):
        return entry
    return None


def _stored_answer(api: CachedApi, entry: dict[str, Any]) -> Any:
    """The answer in a stored entry; a stored not-found is raised as a fresh CallError."""
    if "body" in entry:
        return entry["body"]
    status = entry["status"]
    message = f"HTTP {status} from api '{api.name}' (cached answer)"
    raise CallError("http_status", message, api=api.name, status=status, attempts=0)


def _copy_error(exc: CallError) -> CallError:
    """A CallError equal to ``exc`` (each event gets its own, with its own traceback)."""
    return CallError(
        exc.kind,
        exc.message,
        api=exc.api,
        status=exc.status,
        attempts=exc.attempts,
        retriable=exc.retriable,
        retry_after=exc.retry_after,
    )


# --- the shared part: single flight and counters -------------------------------------------


@dataclass(slots=True)
class CacheStats:
    """Counters: ``hits`` answered from the store, ``misses`` not in it, ``waits`` answered by
    another worker's lease, ``calls`` made by this cache, ``shared`` answered by a call of this
    process already in flight (single flight)."""

    hits: int = 0
    misses: int = 0
    waits: int = 0
    calls: int = 0
    shared: int = 0


class _Flight:
    __slots__ = ("followers", "future")

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.followers = 0


def _cancelled_ourselves() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _CacheBase:
    """Single flight over ``_fetch``, which each store implements."""

    def __init__(self) -> None:
        self.stats = CacheStats()
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._closed = False

    async def get_or_call(self, api: CachedApi, key: str, call: Call) -> Any:
        if self._closed or not caches(api):
            return await call()
        name = (api.name, key)
        while (flight := self._flights.get(name)) is not None:
            flight.followers += 1
            try:
                value = await asyncio.shield(flight.future)
            except asyncio.CancelledError:
                if flight.future.cancelled() and not _cancelled_ourselves():
                    continue  # the leader was cancelled, not us: lead the next fetch
                raise
            except CallError as exc:
                self.stats.shared += 1
                raise _copy_error(exc) from None
            self.stats.shared += 1
            return copy.deepcopy(value)  # from a pristine snapshot: answers may get mutated
        return await self._lead(name, api, key, call)

    async def _lead(self, name: tuple[str, str], api: CachedApi, key: str, call: Call) -> Any:
        flight = self._flights[name] = _Flight()
        try:
            value = await self._fetch(api, key, call)
        except asyncio.CancelledError:
            flight.future.cancel()
            raise
        except BaseException as exc:
            flight.future.set_exception(exc)
            flight.future.exception()  # retrieved: there may be no follower to see it
            raise
        else:
            flight.future.set_result(copy.deepcopy(value) if flight.followers else None)
            return value
        finally:
            del self._flights[name]

    async def _fetch(self, api: CachedApi, key: str, call: Call) -> Any:
        raise NotImplementedError

    async def _call_and_store(
        self, api: CachedApi, call: Call, store: Callable[[bytes | None, float], Awaitable[None]]
    ) -> Any:
        """``await call()``, handing ``store`` what to keep (None: nothing) and for how long."""
        self.stats.calls += 1
        try:
            value = await call()
        except CallError as exc:
            await store(*_error_entry(api, exc))
            raise
        await store(*_answer_entry(api, value))
        return value

    async def close(self) -> None:
        self._closed = True


# --- in memory -----------------------------------------------------------------------------


class MemoryResponseCache(_CacheBase):
    """One process's cache (single flight makes leases pointless here); time from ``clock``."""

    def __init__(self, *, clock: Clock = time.monotonic, max_entries: int = 10_000) -> None:
        super().__init__()
        self._clock = clock
        self._max_entries = max_entries
        self._store: dict[tuple[str, str], tuple[float, bytes]] = {}

    async def _fetch(self, api: CachedApi, key: str, call: Call) -> Any:
        entry = self._store.get((api.name, key))
        if entry is not None and entry[0] > self._clock():
            self.stats.hits += 1
            return _stored_answer(api, json.loads(entry[1]))
        self.stats.misses += 1
        return await self._call_and_store(api, call, functools.partial(self._put, api.name, key))

    async def _put(self, api_name: str, key: str, payload: bytes | None, ttl: float) -> None:
        if payload is None:
            return
        now = self._clock()
        if len(self._store) >= self._max_entries:
            self._store = {k: v for k, v in self._store.items() if v[0] > now}
            if len(self._store) >= self._max_entries:
                del self._store[next(iter(self._store))]  # the oldest stored
        self._store[(api_name, key)] = (now + ttl, payload)

    def ttl(self, api_name: str, key: str) -> float | None:
        """Seconds left for a stored key (None: not stored); for tests."""
        entry = self._store.get((api_name, key))
        left = entry[0] - self._clock() if entry is not None else 0.0
        return left if left > 0 else None

    async def contains(self, api_name: str, keys: Sequence[str]) -> list[bool]:
        return [self.ttl(api_name, key) is not None for key in keys]

    async def close(self) -> None:
        await super().close()
        self._store.clear()


# --- in Redis ------------------------------------------------------------------------------

# Scripts: keys in KEYS[], numbers in ARGV[], times in milliseconds.
_LOOKUP = """-- the stored answer, else take the lease if free: {answer or false, 1 if leased}
-- KEYS[1] cache key, KEYS[2] lease key; ARGV[1] token, ARGV[2] lease (ms)
local answer = redis.call('GET', KEYS[1])
if answer then return {answer, 0} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 1} end
return {false, 0}
"""
_FINISH = """-- store the answer (unless ARGV[2] is empty), then free the lease if still ours
-- KEYS[1] cache key, KEYS[2] lease key; ARGV[1] token, ARGV[2] payload, ARGV[3] TTL (ms)
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""
_RENEW = """-- extend the lease if it is still ours: 1 if extended
-- KEYS[1] lease key; ARGV[1] token, ARGV[2] lease (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


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
