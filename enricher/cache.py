"""The shared response cache: one answer per canonical request, for every worker and replay.

    request_key(api, params)   sha256 of [api, method, URL with its query sorted, POST body]
    ResponseCache              get_or_call / contains / close
    ├── RedisResponseCache     shared by every worker of one app_id (in :mod:`.redis_cache`)
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

The Redis keys, and what happens when Redis is unreachable, are in :mod:`.redis_cache`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .errors import CallError, InvalidEvent
from .urls import UrlTemplate, param_to_str

__all__ = [
    "CacheStats",
    "CachedApi",
    "MemoryResponseCache",
    "ResponseCache",
    "caches",
    "render_url",
    "request_key",
    "request_key_of",
]

NOT_FOUND_STATUSES: Final = frozenset({404, 410})

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
