"""The response cache against a real Redis and a real local API server that counts its calls.

One contract suite runs over the memory and the Redis cache; Redis-only tests cover the lease
between workers, Redis traffic and outages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from enricher.cache import MemoryResponseCache, ResponseCache, request_key, request_key_of
from enricher.caller import ApiCaller
from enricher.config import ApiSettings
from enricher.errors import CallError, InvalidEvent, ServiceUnavailable
from enricher.lanes import Lane
from enricher.redis_cache import RedisResponseCache
from enricher.services import EmbeddedRedis, find_free_port

# --- the third-party API, the limiter and the caller -----------------------------------------


class ThirdParty:
    """Answers ``/<kind>/<id>``: item (200), missing (404), gone (410), fail (500), big (200)."""

    STATUS = {"missing": 404, "gone": 410, "fail": 500}

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.delay = 0.0
        self.base = ""

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{kind}/{id}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        self.calls[kind] += 1
        await asyncio.sleep(self.delay)
        if kind in self.STATUS:
            return web.json_response({"error": kind}, status=self.STATUS[kind])
        body = await request.json() if request.can_read_body else None
        answer = {"id": request.match_info["id"], "body": body, "n": self.calls[kind]}
        if kind == "big":
            answer["data"] = "x" * 5000
        return web.json_response(answer, dumps=compact)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class FakeLimiter:
    def __init__(self) -> None:
        self.acquired: list[tuple[str, Lane | None]] = []

    async def acquire(
        self, api: str, lane: Lane | None = None, seat: asyncio.Semaphore | None = None
    ) -> None:
        self.acquired.append((api, lane))
        if seat is not None:
            await seat.acquire()

    async def block(self, api: str, seconds: float) -> None:
        pass


async def no_sleep(seconds: float) -> None:
    pass


def settings(base: str, path: str = "item/{id}", **extra: Any) -> ApiSettings:
    data = {
        "name": "geo",
        "url": f"{base}/{path}",
        "rate": "1000/s",
        "cache_ttl": "1m",
        "cache_not_found_ttl": "10s",
        "retry": {"attempts": 2, "backoff": "1ms..2ms"},
    }
    return ApiSettings.model_validate(data | extra)


@pytest.fixture
async def api() -> AsyncIterator[ThirdParty]:
    server = ThirdParty()
    runner = web.AppRunner(server.app(), shutdown_timeout=0.1, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def caller_for(
    session: aiohttp.ClientSession, api: ApiSettings, cache: ResponseCache | None
) -> ApiCaller:
    return ApiCaller(
        apis={api.name: api}, limiter=FakeLimiter(), session=session, sleep=no_sleep, cache=cache
    )


# --- stores: memory and Redis ----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.shared = MemoryResponseCache(clock=self.clock)

    def cache(self) -> MemoryResponseCache:
        return self.shared

    async def ttl(self, api_name: str, key: str) -> float | None:
        return self.shared.ttl(api_name, key)


class RedisStore:
    name = "redis"

    def __init__(self, client: Callable[[], aioredis.Redis]) -> None:
        self.client = client
        self.admin = client()
        self.app_id = "t" + uuid.uuid4().hex[:8]  # a private key namespace per test

    def cache(self, **options: Any) -> RedisResponseCache:
        """A new "worker": its own Redis client, the same app_id."""
        return RedisResponseCache(redis=self.client(), app_id=self.app_id, **options)

    def keys(self, key: str) -> tuple[str, str]:
        return self.cache().keys("geo", key)

    async def ttl(self, api_name: str, key: str) -> float | None:
        millis = await self.admin.pttl(self.cache().keys(api_name, key)[0])
        return millis / 1000 if millis > 0 else None


@pytest.fixture
async def clients(redis_service: EmbeddedRedis) -> AsyncIterator[Callable[[], aioredis.Redis]]:
    made: list[aioredis.Redis] = []

    def make() -> aioredis.Redis:
        made.append(aioredis.Redis.from_url(redis_service.url, socket_timeout=2))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def redis_store(clients: Callable[[], aioredis.Redis]) -> RedisStore:
    return RedisStore(clients)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> MemoryStore | RedisStore:
    if request.param == "memory":
        return MemoryStore()
    return RedisStore(request.getfixturevalue("clients"))


# --- request keys ----------------------------------------------------------------------------


def test_request_key_ignores_param_order_and_tells_requests_apart() -> None:
    get = settings("http://api.test", "geo/{ip}?lang={lang}&v=1")
    post = settings("http://api.test", "geo/{ip}", method="POST")
    key = request_key(get, {"ip": "1.2.3.4", "lang": "en"})
    assert len(key) == 64 and int(key, 16) >= 0
    assert request_key(get, {"lang": "en", "ip": "1.2.3.4"}) == key
    assert request_key(get, {"lang": "en", "ip": "1.2.3.4", "unused": 1}) == key  # same request
    body = {"ip": "1.2.3.4", "user": {"id": 7, "tags": ["a"]}, "n": 1}
    reordered = {"n": 1, "user": {"tags": ["a"], "id": 7}, "ip": "1.2.3.4"}
    assert request_key(post, body) == request_key(post, reordered)
    others = {
        request_key(get, {"ip": "1.2.3.5", "lang": "en"}),
        request_key(get, {"ip": "1.2.3.4", "lang": "fr"}),
        request_key(post, {"ip": "1.2.3.4", "lang": "en"}),
        request_key(post, {**body, "n": 2}),
        request_key(
            settings("http://api.test", "geo/{ip}?lang={lang}&v=1", name="geo2"),
            {"ip": "1.2.3.4", "lang": "en"},
        ),
    }
    assert key not in others and len(others) == 5
    assert request_key_of("a", "GET", "http://h/p?b=2&a=1", None) == request_key_of(
        "a", "GET", "http://h/p?a=1&b=2", None
    )
    with pytest.raises(InvalidEvent, match="URL placeholder ip: value is null"):
        request_key(get, {"ip": None, "lang": "en"})


async def test_the_caller_stores_under_request_key(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    """The dry-run planner's keys are the caller's keys."""
    geo = settings(api.base, "item/{id}", method="POST")
    cache = store.cache()
    await caller_for(session, geo, cache).call("geo", {"id": "1", "b": {"y": 1, "x": 2}})
    planned = [request_key(geo, {"b": {"x": 2, "y": 1}, "id": "1"}), request_key(geo, {"id": "2"})]
    assert await cache.contains("geo", planned) == [True, False]
    assert await cache.contains("geo", []) == []


# --- the contract, over both stores ----------------------------------------------------------


async def test_hit_after_miss_makes_no_call(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    cache = store.cache()
    caller = caller_for(session, settings(api.base), cache)
    first = await caller.call("geo", {"id": "1"})
    assert await caller.call("geo", {"id": "1"}) == first == {"id": "1", "body": None, "n": 1}
    await caller.call("geo", {"id": "2"})
    assert api.calls == {"item": 2}
    assert (cache.stats.hits, cache.stats.misses, cache.stats.calls) == (1, 2, 2)


async def test_answers_live_for_cache_ttl(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    geo = settings(api.base, cache_ttl="90s")
    await caller_for(session, geo, store.cache()).call("geo", {"id": "1"})
    ttl = await store.ttl("geo", request_key(geo, {"id": "1"}))
    assert ttl is not None and 89 < ttl <= 90
    if isinstance(store, MemoryStore):  # step time past the TTL: the next call is a miss
        store.clock.now += 90
        await caller_for(session, geo, store.cache()).call("geo", {"id": "1"})
        assert api.calls == {"item": 2}


@pytest.mark.parametrize(("kind", "status"), [("missing", 404), ("gone", 410)])
async def test_not_found_is_cached_with_its_own_ttl_and_reraised(
    store: MemoryStore | RedisStore,
    api: ThirdParty,
    session: aiohttp.ClientSession,
    kind: str,
    status: int,
) -> None:
    geo = settings(api.base, f"{kind}/{{id}}", cache_not_found_ttl="30s")
    caller = caller_for(session, geo, store.cache())
    with pytest.raises(CallError) as first:
        await caller.call("geo", {"id": "1"})
    with pytest.raises(CallError) as again:
        await caller.call("geo", {"id": "1"})
    assert api.calls == {kind: 1}
    assert (first.value.status, first.value.attempts) == (status, 1)
    error = again.value
    assert (error.kind, error.status, error.attempts, error.api) == (
        "http_status",
        status,
        0,
        "geo",
    )
    assert error.message == f"HTTP {status} from api 'geo' (cached answer)" and not error.retriable
    ttl = await store.ttl("geo", request_key(geo, {"id": "1"}))
    assert ttl is not None and 29 < ttl <= 30


async def test_not_found_without_its_ttl_and_other_errors_are_not_cached(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    cache = store.cache()
    for path, ttl in (("missing/{id}", "0s"), ("fail/{id}", "30s")):
        caller = caller_for(session, settings(api.base, path, cache_not_found_ttl=ttl), cache)
        for _ in range(2):
            with pytest.raises(CallError):
                await caller.call("geo", {"id": "1"})
    assert api.calls == {"missing": 2, "fail": 4}  # 500 is retried: 2 attempts per call
    assert cache.stats.hits == 0


async def test_not_found_only_caching(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    cache = store.cache()
    for path in ("item/{id}", "missing/{id}"):
        caller = caller_for(session, settings(api.base, path, cache_ttl=0), cache)
        for _ in range(2):
            with contextlib.suppress(CallError):
                await caller.call("geo", {"id": "1"})
    assert api.calls == {"item": 2, "missing": 1}


async def test_answers_over_max_response_bytes_are_not_stored(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    cache = store.cache()
    answer = await caller_for(session, settings(api.base, "big/{id}"), cache).call(
        "geo", {"id": "1"}
    )
    size = len(compact(answer))  # stored as {"body":<answer>}: 9 bytes more
    for cap, calls in ((size + 8, 3), (size + 9, 4)):  # id and n keep the same length
        geo = settings(api.base, "big/{id}", max_response_bytes=cap)
        for _ in range(2):
            await caller_for(session, geo, cache).call("geo", {"id": str(calls)})
        assert api.calls["big"] == calls


async def test_single_flight_in_one_worker(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    api.delay = 0.1
    cache = store.cache()
    caller = caller_for(session, settings(api.base), cache)
    answers = await asyncio.gather(*(caller.call("geo", {"id": "1"}) for _ in range(50)))
    assert api.calls == {"item": 1}
    assert all(answer == answers[0] for answer in answers)
    assert len({id(answer) for answer in answers}) == 50  # each event gets its own copy
    assert (cache.stats.calls, cache.stats.shared) == (1, 49)


async def test_single_flight_shares_errors(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    api.delay = 0.05
    caller = caller_for(session, settings(api.base, "fail/{id}"), store.cache())
    results = await asyncio.gather(
        *(caller.call("geo", {"id": "1"}) for _ in range(10)), return_exceptions=True
    )
    assert api.calls == {"fail": 2}  # one call of 2 attempts
    assert all(isinstance(r, CallError) and (r.status, r.attempts) == (500, 2) for r in results)
    assert len({id(r) for r in results}) == 10


async def test_a_cancelled_leader_hands_over(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    api.delay = 0.2
    caller = caller_for(session, settings(api.base), store.cache())
    leader = asyncio.create_task(caller.call("geo", {"id": "1"}))
    await asyncio.sleep(0.05)
    follower = asyncio.create_task(caller.call("geo", {"id": "1"}))
    await asyncio.sleep(0.05)
    leader.cancel()
    assert (await asyncio.wait_for(follower, 2))["id"] == "1"
    assert leader.cancelled()


async def test_uncached_api_only_calls(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    cache = store.cache()
    caller = caller_for(session, settings(api.base, cache_ttl=0, cache_not_found_ttl=0), cache)
    await asyncio.gather(*(caller.call("geo", {"id": "1"}) for _ in range(3)))
    assert api.calls == {"item": 3}
    assert await cache.contains("geo", [request_key(settings(api.base), {"id": "1"})]) == [False]


async def test_a_closed_cache_only_calls(
    store: MemoryStore | RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    cache = store.cache()
    await cache.close()
    caller = caller_for(session, settings(api.base), cache)
    await caller.call("geo", {"id": "1"})
    await caller.call("geo", {"id": "1"})
    assert api.calls == {"item": 2}


# --- Redis: several workers, traffic, outages ------------------------------------------------


async def test_two_workers_make_one_call(
    redis_store: RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    api.delay = 0.2
    geo = settings(api.base)
    workers = [redis_store.cache(), redis_store.cache()]
    callers = [caller_for(session, geo, cache) for cache in workers]
    answers = await asyncio.gather(*(callers[i % 2].call("geo", {"id": "1"}) for i in range(50)))
    assert api.calls == {"item": 1}
    assert all(answer == answers[0] for answer in answers)
    stats = sorted((w.stats for w in workers), key=lambda s: s.calls)
    assert (stats[0].calls, stats[0].waits, stats[0].shared) == (0, 1, 24)  # waited on the lease
    assert (stats[1].calls, stats[1].waits, stats[1].shared) == (1, 0, 24)
    key = request_key(geo, {"id": "1"})
    cache_key, lease_key = redis_store.keys(key)
    assert cache_key == f"enricher:{{{redis_store.app_id}:geo}}:cache:{key}"
    assert json.loads(await redis_store.admin.get(cache_key)) == {"body": answers[0]}
    assert b" " not in await redis_store.admin.get(cache_key)  # compact JSON
    assert not await redis_store.admin.exists(lease_key)  # released


async def test_a_dead_workers_lease_expires_and_the_waiter_calls(
    redis_store: RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    geo = settings(api.base)
    cache = redis_store.cache()
    _, lease_key = redis_store.keys(request_key(geo, {"id": "1"}))
    await redis_store.admin.set(lease_key, "a-worker-that-died", px=300)
    started = time.monotonic()
    await caller_for(session, geo, cache).call("geo", {"id": "1"})
    assert time.monotonic() - started >= 0.25
    assert api.calls == {"item": 1}
    assert (cache.stats.calls, cache.stats.waits) == (1, 0)
    assert not await redis_store.admin.exists(lease_key)


async def test_a_lease_freed_without_an_answer_passes_to_a_waiter(
    redis_store: RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    api.delay = 0.1
    geo = settings(api.base, "fail/{id}")
    workers = [redis_store.cache(), redis_store.cache()]
    results = await asyncio.gather(
        *(caller_for(session, geo, cache).call("geo", {"id": "1"}) for cache in workers),
        return_exceptions=True,
    )
    assert all(isinstance(r, CallError) and r.status == 500 for r in results)
    assert [w.stats.calls for w in workers] == [1, 1]  # one after the other, never both at once
    assert api.calls == {"fail": 4}


async def test_the_holder_renews_its_lease_while_calling(
    redis_store: RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    api.delay = 0.5  # longer than the lease
    geo = settings(api.base)
    workers = [redis_store.cache(lease=0.15), redis_store.cache(lease=0.15)]
    await asyncio.gather(
        *(caller_for(session, geo, cache).call("geo", {"id": "1"}) for cache in workers)
    )
    assert api.calls == {"item": 1}


def _command_count(info: dict[str, Any]) -> int:
    return sum(v["calls"] for k, v in info.items() if k != "cmdstat_info")


async def test_uncached_api_makes_no_redis_traffic(
    redis_store: RedisStore, api: ThirdParty, session: aiohttp.ClientSession
) -> None:
    cache = redis_store.cache()
    caller = caller_for(session, settings(api.base, cache_ttl=0, cache_not_found_ttl=0), cache)
    before = _command_count(await redis_store.admin.info("commandstats"))
    for _ in range(5):
        await caller.call("geo", {"id": "1"})
    assert _command_count(await redis_store.admin.info("commandstats")) == before
    assert api.calls == {"item": 5}


async def test_redis_never_reachable_still_calls(
    api: ThirdParty, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="enricher.cache")
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{find_free_port()}/0")
    try:
        cache = RedisResponseCache(redis=client, app_id="t")
        caller = caller_for(session, settings(api.base), cache)
        answers = [await caller.call("geo", {"id": str(i % 2)}) for i in range(4)]
        assert [a["id"] for a in answers] == ["0", "1", "0", "1"] and api.calls == {"item": 4}
        with pytest.raises(ServiceUnavailable):
            await cache.contains("geo", ["k"])
    finally:
        await client.aclose()
    assert sum("Redis unavailable" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


async def test_redis_outage_degrades_to_calling_and_recovers(
    own_redis: EmbeddedRedis,
    api: ThirdParty,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="enricher.cache")
    client = aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=1, socket_timeout=1)
    try:
        caller = caller_for(
            session, settings(api.base), RedisResponseCache(redis=client, app_id="t")
        )
        for _ in range(2):
            await caller.call("geo", {"id": "1"})
        assert api.calls == {"item": 1}
        await own_redis.astop()
        for _ in range(3):
            assert (await caller.call("geo", {"id": "1"}))["id"] == "1"
        assert api.calls == {"item": 4}
        await own_redis.astart()  # empty: nothing was persisted
        await asyncio.sleep(0.1)  # past the next probe
        for _ in range(2):
            await caller.call("geo", {"id": "1"})
        assert api.calls == {"item": 5}
    finally:
        await client.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Redis unavailable" in m for m in messages) == 1  # once per outage
    assert sum("reachable again" in m for m in messages) == 1
