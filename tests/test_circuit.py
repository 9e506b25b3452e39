"""Circuit breakers shared through Redis: an API that keeps failing holds its calls (no CallError),
one probe at a time after each cool-down, other APIs flow, and the held calls complete once it
recovers; two workers share one circuit."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web

from enricher.caller import ApiCaller
from enricher.circuit import CircuitBreaker, Ticket, outcome_of, read_circuit
from enricher.config import ApiSettings
from enricher.errors import CallError, ShuttingDown
from enricher.limiter import RedisLimiter
from enricher.quota import Keys
from enricher.services import EmbeddedRedis

COOL_DOWN = 0.3


@dataclass
class Server:
    """Two APIs on one server: ``/down/...`` answers 503 while ``down`` is set (after
    ``latency``), ``/up/...`` always answers. Records when each call to ``/down`` arrived, from
    which worker (``X-Worker``), and how many overlapped."""

    down: bool = True
    latency: float = 0.0
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    up_calls: int = 0
    base: str = ""

    async def down_api(self, request: web.Request) -> web.Response:
        self.arrivals.append((time.monotonic(), request.headers.get("X-Worker", "")))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        if self.down:
            return web.json_response({"error": "down"}, status=503)
        return web.json_response({"id": request.match_info["id"]})

    async def up_api(self, request: web.Request) -> web.Response:
        self.up_calls += 1
        return web.json_response({"id": request.match_info["id"]})

    def since(self, moment: float) -> list[tuple[float, str]]:
        return [arrival for arrival in self.arrivals if arrival[0] >= moment]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    backend = Server()
    app = web.Application()
    app.router.add_get("/down/{id}", backend.down_api)
    app.router.add_get("/up/{id}", backend.up_api)
    runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield backend
    await runner.cleanup()


def apis(base: str, worker: str = "a", failures: int = 3) -> dict[str, ApiSettings]:
    def api(name: str) -> ApiSettings:
        return ApiSettings.model_validate(
            {
                "name": name,
                "url": f"{base}/{name}/{{id}}",
                "headers": {"X-Worker": worker},
                "timeout": "1s",
                "rate": "1000/s",
                "burst": 100,
                "retry": {"attempts": 3, "backoff": "10ms..50ms"},
                "circuit": {"failures": failures, "cool_down": COOL_DOWN},
            }
        )

    return {"down": api("down"), "up": api("up")}


@dataclass
class Worker:
    caller: ApiCaller
    breaker: CircuitBreaker
    client: aioredis.Redis
    app_id: str
    refreshes: list[float] = field(default_factory=list)

    async def call(self, api: str, ident: int | str) -> Any:
        return await self.caller.call(api, {"id": str(ident)})


@pytest.fixture
async def make_worker(
    redis_server: EmbeddedRedis,
) -> AsyncIterator[Callable[..., Worker]]:
    """Workers (own Redis client, limiter, breaker, HTTP session) sharing one app id."""
    app_id = f"c{uuid.uuid4().hex[:8]}"
    made: list[tuple[Worker, RedisLimiter, aiohttp.ClientSession]] = []

    def build(settings: Mapping[str, ApiSettings]) -> Worker:
        with redis.Redis.from_url(redis_server.url) as sync:  # an epoch: no first-start hold
            for name in settings:
                sync.set(Keys.of(app_id, name).epoch, "1", px=3_600_000, nx=True)
        client = aioredis.Redis.from_url(redis_server.url)
        limiter = RedisLimiter(redis=client, app_id=app_id, apis=settings)
        breaker = CircuitBreaker(redis=client, app_id=app_id, apis=settings)
        session = aiohttp.ClientSession()
        caller = ApiCaller(apis=settings, limiter=limiter, session=session, circuits=breaker)
        worker = Worker(caller, breaker, client, app_id)
        check = breaker._check_script

        async def counted(*args: Any, **kwargs: Any) -> Any:  # how often the view is refreshed
            worker.refreshes.append(time.monotonic())
            return await check(*args, **kwargs)

        breaker._check_script = counted  # type: ignore[assignment]
        made.append((worker, limiter, session))
        return worker

    yield build
    for worker, limiter, session in made:
        await worker.caller.close()
        await limiter.close()
        await session.close()
        await worker.client.aclose()


async def held(tasks: list[asyncio.Task[Any]], seconds: float) -> bool:
    """None of ``tasks`` ends within ``seconds``."""
    done, _ = await asyncio.wait(tasks, timeout=seconds)
    return not done


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def test_a_failing_api_holds_its_calls_and_probes_once_per_cool_down(
    server: Server, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(apis(server.base))
    calls = [asyncio.create_task(worker.call("down", i)) for i in range(5)]
    assert await held(calls, 0.25)  # 5 failures open the circuit at the 3rd; nobody gives up
    opened_by = len(server.arrivals)
    assert 3 <= opened_by <= 7  # the first calls fail, at most two of them retry once more
    state = await read_circuit(worker.client, worker.app_id, "down")
    assert state.state in ("open", "half-open") and state.failures >= 3

    # Other APIs keep flowing while this one is held.
    assert [await worker.call("up", i) for i in range(3)] == [{"id": str(i)} for i in range(3)]

    watch_from = time.monotonic()
    refreshes_before = len(worker.refreshes)
    assert await held(calls, 1.25)
    probes = [moment for moment, _ in server.since(watch_from)]
    assert 2 <= len(probes) <= 5  # one probe per cool-down (0.3 s), not the held calls
    assert all(gap >= COOL_DOWN - 0.02 for gap in gaps(probes))
    assert len(worker.refreshes) - refreshes_before <= 8  # one look per API, not per holder

    server.down = False
    results = await asyncio.wait_for(asyncio.gather(*calls), COOL_DOWN + 1.0)
    assert results == [{"id": str(i)} for i in range(5)]
    assert (await read_circuit(worker.client, worker.app_id, "down")).state == "closed"
    await asyncio.wait_for(worker.call("down", 9), 0.5)  # flowing again


async def test_two_workers_share_one_circuit_and_one_probe_at_a_time(
    server: Server, make_worker: Callable[..., Worker]
) -> None:
    first, second = make_worker(apis(server.base, "a")), make_worker(apis(server.base, "b"))
    held_first = [asyncio.create_task(first.call("down", i)) for i in range(3)]
    assert await held(held_first, 0.2)  # first opened the circuit
    server.latency = 0.15  # probes overlap if two are ever made at once
    server.max_in_flight = server.in_flight  # count from here: the calls that opened it may overlap
    opened_at = time.monotonic()
    held_second = [asyncio.create_task(second.call("down", 10 + i)) for i in range(3)]
    assert await held(held_first + held_second, 1.2)
    probes = server.since(opened_at)
    assert 2 <= len(probes) <= 5
    assert server.max_in_flight == 1  # one probe at a time, whichever worker made it
    assert all(gap >= COOL_DOWN - 0.02 for gap in gaps([moment for moment, _ in probes]))

    server.down = False
    results = await asyncio.wait_for(asyncio.gather(*held_first, *held_second), 2.0)
    assert results == [{"id": str(i)} for i in (0, 1, 2, 10, 11, 12)]


async def test_close_wakes_held_calls_with_shutting_down(
    server: Server, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(apis(server.base))
    calls = [asyncio.create_task(worker.call("down", i)) for i in range(4)]
    assert await held(calls, 0.2)
    closed_at = time.monotonic()
    await worker.caller.close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 1)
    assert time.monotonic() - closed_at < 0.1
    assert all(isinstance(result, ShuttingDown) for result in results)
    with pytest.raises(ShuttingDown):
        await worker.call("down", 9)


async def test_failures_zero_turns_the_breaker_off(
    server: Server, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(apis(server.base, failures=0))
    errors = await asyncio.gather(
        *(worker.call("down", i) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(e, CallError) and e.attempts == 3 for e in errors)
    assert len(server.arrivals) == 15


async def test_a_success_resets_the_run_of_failures(
    server: Server, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(apis(server.base, failures=4))
    app_id = worker.app_id
    with pytest.raises(CallError):
        await worker.call("down", 1)  # 3 failed attempts: one short of opening
    assert (await read_circuit(worker.client, app_id, "down")).failures == 3
    server.down = False
    await worker.call("down", 2)
    assert (await read_circuit(worker.client, app_id, "down")).failures == 0
    server.down = True
    with pytest.raises(CallError):
        await worker.call("down", 3)
    assert (await read_circuit(worker.client, app_id, "down")).state == "closed"
    for key in Keys.of(app_id, "down").circuit[:2]:
        ttl = await worker.client.pttl(key)
        assert ttl == -2 or ttl > 0, key


async def test_circuit_keys_have_ttls(server: Server, make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(apis(server.base))
    calls = [asyncio.create_task(worker.call("down", i)) for i in range(3)]
    assert await held(calls, COOL_DOWN + 0.2)  # open, then a probe holds the lease
    keys = Keys.of(worker.app_id, "down").circuit
    assert [await worker.client.pttl(key) > 0 for key in keys[:2]] == [True, True]
    for task in calls:
        task.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, "success"),
        (CallError("timeout", "t"), "failure"),
        (CallError("connection", "c"), "failure"),
        (CallError("bad_response", "invalid HTTP"), "failure"),
        (CallError("http_status", "x", status=503), "failure"),
        (CallError("http_status", "x", status=500), "failure"),
        (CallError("http_status", "x", status=429), "success"),
        (CallError("http_status", "x", status=404), "success"),
        (CallError("bad_response", "not JSON", status=200), "success"),
    ],
)
def test_what_counts_as_a_failure(error: CallError | None, outcome: str) -> None:
    assert outcome_of(error) == outcome


async def test_an_answer_read_after_the_opening_one_does_not_close_the_view(
    make_worker: Callable[..., Worker], server: Server
) -> None:
    breaker = make_worker(apis(server.base)).breaker
    send = breaker._send
    second_answered, read_second = asyncio.Event(), asyncio.Event()

    async def second_read_late(gate: Any, ticket: Ticket, outcome: str) -> Any:
        reply = await send(gate, ticket, outcome)
        if int(reply[2]) == 2:  # the second failure's answer: read after the third's
            second_answered.set()
            await read_second.wait()
        return reply

    breaker._send = second_read_late  # type: ignore[method-assign]
    tickets = [await breaker.enter("down") for _ in range(3)]
    first = await breaker.record(tickets[0], "failure")
    second = asyncio.ensure_future(breaker.record(tickets[1], "failure"))
    await second_answered.wait()
    third = await breaker.record(tickets[2], "failure")
    read_second.set()
    assert (first, third) == (False, True)  # the third failure opened the circuit
    assert await second is True  # read late, while open: hold and retry
    entering = asyncio.ensure_future(breaker.enter("down"))
    assert await held([entering], 0.1)  # the view stays open: nobody goes through
    entering.cancel()
    await asyncio.gather(entering, return_exceptions=True)
