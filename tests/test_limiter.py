"""The limiters: one contract suite over MemoryLimiter and RedisLimiter (live calls and replay
lanes), then Redis-only checks (several workers, key TTLs, the Lua calendar, outages) against a
private redis-server."""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import pytest
import redis
import redis.asyncio as aioredis

from enricher.config import ApiSettings, config_from_dict
from enricher.errors import BadArgument, ShuttingDown
from enricher.lanes import Lane
from enricher.limiter import (
    MemoryLimiter,
    RedisLimiter,
    acquire_args,
    parse_reply,
    reply_sight,
)
from enricher.limits_cli import reset_limits, set_limits, show_limits
from enricher.local_limiter import LIVE_ASKERS, Decision, LocalFallback
from enricher.quota import (
    PERIODS,
    ApiUsage,
    Keys,
    Limits,
    ShadowUsage,
    load_script,
    period_bounds,
    read_usage,
    reset_overrides,
    set_overrides,
)
from enricher.services import EmbeddedRedis
from enricher.units import QuotaPeriod


class AnyLimiter(Protocol):
    async def acquire(
        self, api: str, lane: Lane | None = None, seat: asyncio.Semaphore | None = None
    ) -> int | None: ...
    async def _decide(self, api: str, lane: Lane | None) -> Decision: ...
    async def replay_usage(
        self, api: str, replay_id: str
    ) -> dict[QuotaPeriod, dict[str, int | None]]: ...
    async def block(self, api: str, seconds: float) -> None: ...
    async def server_signal(
        self, api: str, remaining: int, reset: float, grant: int | None = None
    ) -> None: ...
    async def close(self) -> None: ...
    async def usage(self, api: str) -> ApiUsage: ...
    async def reset_overrides(self, api: str, *, reset_usage: bool = False) -> None: ...
    async def set_overrides(
        self,
        api: str,
        *,
        rate: float | None = None,
        burst: int | None = None,
        quotas: Mapping[str, int | None] | None = None,
        shadow_rate: float | None = None,
        shadow_burst: int | None = None,
    ) -> None: ...


Factory = Callable[..., AnyLimiter]


def apis(*specs: tuple[str, str, int, Sequence[str]]) -> dict[str, ApiSettings]:
    """``(name, rate, burst, quotas)`` -> real config models."""
    return {
        name: ApiSettings.model_validate(
            {"name": name, "url": "http://127.0.0.1/x", "rate": rate, "burst": burst, "quotas": q}
        )
        for name, rate, burst, q in specs
    }


def max_in_window(times: Sequence[float], width: float) -> int:
    """Most events in any half-open window ``[t, t + width)``."""
    ordered = sorted(times)
    return max(bisect.bisect_left(ordered, t + width) - i for i, t in enumerate(ordered))


async def timed_acquires(
    limiter: AnyLimiter, api: str, n: int, lane: Lane | None = None
) -> list[float]:
    loop = asyncio.get_running_loop()

    async def one() -> float:
        await limiter.acquire(api, lane)
        return loop.time()

    return sorted(await asyncio.gather(*(one() for _ in range(n))))


async def saturate(
    limiter: AnyLimiter, api: str, lane: Lane | None, tasks: int, seconds: float
) -> list[float]:
    """``tasks`` callers acquiring in a loop for ``seconds``: the grant times."""
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def caller() -> None:
        while True:
            await limiter.acquire(api, lane)
            times.append(loop.time())

    callers = [asyncio.create_task(caller()) for _ in range(tasks)]
    await asyncio.sleep(seconds)
    for task in callers:
        task.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    return times


def shadow_twin(slots: Sequence[float], rate: float, burst: int, interval: float = 0.0) -> int:
    """The calls a GCRA policer of ``rate``/``burst`` would have delayed, among calls made at
    ``slots`` (in decision order): the Python twin of the shadow in ``acquire.lua``."""
    interval = interval or 1 / rate
    tat, delayed = 0.0, 0
    for slot in slots:
        if tat - (burst - 1) * interval > slot:
            delayed += 1
        else:
            tat = max(tat, slot) + interval
    return delayed


def arrivals(n: int, per_second: float, seed: int = 3) -> list[float]:
    """``n`` irregular arrival times (epoch seconds), ``per_second`` on average."""
    rng, moment = random.Random(seed), 1_700_000_000.0
    times = []
    for _ in range(n):
        moment += rng.expovariate(per_second) if rng.random() < 0.8 else 0.0  # some bunched
        times.append(moment)
    return times


async def still_waiting(task: asyncio.Task[Any], seconds: float) -> bool:
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return not done


def warm_up(url: str, app_id: str, names: Iterable[str]) -> None:
    """Mark these APIs as having run before (an epoch exists), so a test's first calls are not
    held by the fail-closed start of a new epoch (``test_state_loss.py`` tests that)."""
    with redis.Redis.from_url(url) as client:
        for name in names:
            client.set(Keys.of(app_id, name).epoch, "1", px=3_600_000, nx=True)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def own_server() -> Iterator[EmbeddedRedis]:
    """A server this test may stop and restart."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def make_redis(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis
) -> AsyncIterator[Callable[..., RedisLimiter]]:
    """RedisLimiters on separate clients (like separate workers) sharing app_id ``test``."""
    made: list[tuple[RedisLimiter, aioredis.Redis]] = []

    def build(specs: Mapping[str, ApiSettings], url: str | None = None, **kw: Any) -> RedisLimiter:
        warm_up(url or redis_server.url, "test", specs)
        client = aioredis.Redis.from_url(url or redis_server.url)
        limiter = RedisLimiter(redis=client, app_id="test", apis=specs, **kw)
        made.append((limiter, client))
        return limiter

    yield build
    for limiter, client in made:
        await limiter.close()
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def make(
    request: pytest.FixtureRequest, make_redis: Callable[..., RedisLimiter]
) -> AsyncIterator[Factory]:
    """The contract suite runs over both implementations."""
    memories: list[MemoryLimiter] = []

    def build(specs: Mapping[str, ApiSettings], **kw: Any) -> AnyLimiter:
        if request.param == "redis":
            return make_redis(specs, **kw)
        memories.append(MemoryLimiter(apis=specs, **kw))
        return memories[-1]

    yield build
    for limiter in memories:
        await limiter.close()


# --- contract: both implementations -----------------------------------------------------------


async def test_burst_then_paced_by_reservation(make: Factory) -> None:
    rate, burst, n = 50, 5, 80
    limiter = make(apis(("geo", f"{rate}/s", burst, ())))
    await asyncio.gather(*(limiter.usage("geo") for _ in range(n)))  # open the connections
    # A shadow limit of 5/s enforces nothing: every figure below is the same without it.
    await limiter.set_overrides("geo", shadow_rate=5.0, shadow_burst=1)
    start = asyncio.get_running_loop().time()
    times = await timed_acquires(limiter, "geo", n)

    assert times[burst - 1] - start < 0.15  # the burst goes at once (slack for a busy machine)
    assert max_in_window(times, 1.0) <= burst + rate
    expected = (n - burst) / rate
    assert expected - 0.02 <= times[-1] - start <= expected + 0.5
    gaps = [b - a for a, b in zip(times[burst:], times[burst + 1 :], strict=False)]
    assert 0.8 / rate <= statistics.median(gaps) <= 1.2 / rate  # spread ~1/rate apart ...
    assert max_in_window(times[burst:], 0.1) <= 0.1 * rate + 2  # ... not bunched
    shadow = (await limiter.usage("geo")).shadow
    assert shadow is not None and (shadow.rate, shadow.burst, shadow.calls) == (5.0, 1, n)
    assert abs(shadow.delayed - shadow_twin(times, 5.0, 1)) <= 2  # measured, not Redis, times


async def test_quota_lets_exactly_n_through_then_holds_until_raised(make: Factory) -> None:
    limiter = make(apis(("geo", "1000/s", 100, ["3/day"])), retry_cap=0.3)
    for _ in range(3):
        await asyncio.wait_for(limiter.acquire("geo"), 1)
    fourth = asyncio.create_task(limiter.acquire("geo"))
    assert await still_waiting(fourth, 0.5)
    usage = await limiter.usage("geo")
    assert [(q.period, q.limit, q.used, q.remaining) for q in usage.quotas] == [("day", 3, 3, 0)]

    raised_at = time.monotonic()
    await limiter.set_overrides("geo", quotas={"day": 5})
    await asyncio.wait_for(fourth, 2)
    assert time.monotonic() - raised_at < 1.0  # noticed within the retry cap
    await asyncio.wait_for(limiter.acquire("geo"), 1)
    sixth = asyncio.create_task(limiter.acquire("geo"))
    assert await still_waiting(sixth, 0.4)
    sixth.cancel()  # the caller's own cancellation stays a cancellation
    with pytest.raises(asyncio.CancelledError):
        await sixth
    assert [q.used for q in (await limiter.usage("geo")).quotas] == [5]


async def test_rate_override_applies_to_the_next_calls(make: Factory) -> None:
    limiter = make(apis(("geo", "1000/s", 100, ())))
    await limiter.set_overrides("geo", rate=10.0, burst=1)
    times = await timed_acquires(limiter, "geo", 6)
    assert 0.45 <= times[-1] - times[0] <= 0.8
    await limiter.reset_overrides("geo")
    times = await timed_acquires(limiter, "geo", 20)
    assert times[-1] - times[0] < 0.1


async def test_block_delays_acquires_and_never_shortens(make: Factory) -> None:
    limiter = make(apis(("geo", "100/s", 10, ())), retry_cap=1.0)
    await limiter.block("geo", 0.4)
    await limiter.block("geo", 0.1)  # a shorter Retry-After keeps the longer block
    started = time.monotonic()
    await asyncio.wait_for(limiter.acquire("geo"), 2)
    assert 0.35 <= time.monotonic() - started <= 0.8


async def test_usage_shows_effective_limits_and_overrides(make: Factory) -> None:
    limiter = make(apis(("geo", "50/s", 5, ["100/day", "10/minute"])))
    for _ in range(3):
        await limiter.acquire("geo")
    await limiter.set_overrides("geo", rate=20.0, burst=2, quotas={"hour": 7})
    await limiter.block("geo", 30)
    usage = await limiter.usage("geo")
    assert (usage.rate, usage.burst) == (20.0, 2)
    assert usage.overrides == {"rate": "20.0", "burst": "2", "quota:hour": "7"}
    table = [(q.period, q.limit, q.used, q.remaining) for q in usage.quotas]
    assert table == [("minute", 10, 3, 7), ("hour", 7, 0, 7), ("day", 100, 3, 97)]
    minute_reset = usage.quotas[0].resets_at
    assert minute_reset.tzinfo == UTC and minute_reset.second == 0
    assert 0 < minute_reset.timestamp() - time.time() <= 60
    assert usage.blocked_until is not None
    assert 29 < usage.blocked_until.timestamp() - time.time() <= 30.5
    report = usage.as_dict()
    assert report["quotas"][2]["resets_at"].endswith("+00:00")
    assert datetime.fromisoformat(report["quotas"][2]["resets_at"]).hour == 0

    await limiter.reset_overrides("geo")
    usage = await limiter.usage("geo")
    assert (usage.rate, usage.burst, usage.overrides) == (50.0, 5, {})
    assert [(q.period, q.used) for q in usage.quotas] == [("minute", 3), ("day", 3)]
    await limiter.reset_overrides("geo", reset_usage=True)
    assert [q.used for q in (await limiter.usage("geo")).quotas] == [0, 0]


async def test_close_makes_every_waiter_raise_shutting_down(make: Factory) -> None:
    limiter = make(apis(("spent", "100/s", 10, ["1/day"]), ("slow", "1/s", 1, ())), max_wait=5.0)
    await limiter.acquire("spent")
    await limiter.acquire("slow")
    waiters = [asyncio.create_task(limiter.acquire("spent")) for _ in range(5)]
    waiters.append(asyncio.create_task(limiter.acquire("slow")))  # sleeping on its reservation
    assert await still_waiting(waiters[-1], 0.2)
    closed_at = time.monotonic()
    await limiter.close()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1)
    assert time.monotonic() - closed_at < 0.2
    assert all(isinstance(r, ShuttingDown) for r in results)
    with pytest.raises(ShuttingDown):
        await limiter.acquire("slow")


async def test_rejects_unknown_api_and_bad_overrides(make: Factory) -> None:
    limiter = make(apis(("geo", "5/s", 1, ())))
    with pytest.raises(ValueError, match="unknown API"):
        await limiter.acquire("nope")
    with pytest.raises(ValueError, match="burst"):
        await limiter.set_overrides("geo", burst=0)
    with pytest.raises(ValueError, match="period"):
        await limiter.set_overrides("geo", quotas={"week": 3})


async def test_server_budget_paces_then_holds_every_call(make: Factory) -> None:
    limiter = make(apis(("geo", "100/s", 10, ()), ("big", "100/s", 10, ())))
    first = await limiter._decide("geo", None)
    assert first.granted and first.grant is not None
    await limiter.server_signal("geo", 2, 0.5, first.grant)  # its answer: 2 left for 0.5 s
    paced = [await limiter._decide("geo", None) for _ in range(2)]
    assert [d.granted for d in paced] == [True, True]
    assert paced[0].rate == pytest.approx(4.0, rel=0.05)  # 2 left over 0.5 s, burst 1
    assert 0.2 <= paced[1].wait <= 0.26  # spread out, not at our 100/s
    spent = await limiter._decide("geo", None)
    assert (spent.granted, spent.reason) == (False, "server") and 0.4 < spent.wait <= 0.5
    server = (await limiter.usage("geo")).server
    assert server is not None and (server.left, server.pace) == (0, 0.0)
    assert 0.4 < server.reset_at.timestamp() - time.time() <= 0.5
    # An answer that arrives late, from before the others, cannot loosen it.
    await limiter.server_signal("geo", 5, 0.5, first.grant)
    assert (await limiter._decide("geo", None)).reason == "server"

    grant = await limiter.acquire("big")
    await limiter.server_signal("big", 1000, 1.0, grant)  # more than our rate: no pacing
    assert (await limiter._decide("big", None)).rate == 100.0
    await limiter.server_signal("big", 0, 2.0, grant)  # none left: blocked until the reset
    refused = await limiter._decide("big", None)
    assert (refused.granted, refused.reason) == (False, "blocked") and 1.9 < refused.wait <= 2.0


# --- contract: replay lanes -------------------------------------------------------------------


async def test_replay_lane_is_paced_at_its_share_of_the_rate(make: Factory) -> None:
    limiter = make(apis(("geo", "40/s", 4, ())))
    await asyncio.gather(*(limiter.usage("geo") for _ in range(12)))  # open the connections
    start = asyncio.get_running_loop().time()
    times = await timed_acquires(limiter, "geo", 12, Lane("r1", 0.25))  # 10/s, burst 1

    assert max_in_window(times, 1.0) <= 10 + 1
    assert 1.1 - 0.02 <= times[-1] - start <= 1.1 + 0.4  # 11 intervals of 0.1 s, not starved
    # live calls still find their burst: the replay took single slots of the shared bucket
    live = await timed_acquires(limiter, "geo", 3)
    assert live[-1] - times[-1] < 0.05


async def test_live_keeps_the_rest_while_a_replay_saturates_its_share(make: Factory) -> None:
    rate, burst, share, seconds = 40, 4, 0.25, 1.8
    limiter = make(apis(("geo", f"{rate}/s", burst, ())))
    await asyncio.gather(*(limiter.usage("geo") for _ in range(16)))
    start = asyncio.get_running_loop().time()
    live, replay = await asyncio.gather(
        saturate(limiter, "geo", None, 8, seconds),
        saturate(limiter, "geo", Lane("r1", share), 8, seconds),
    )
    live = [t for t in live if t < start + seconds]
    replay = [t for t in replay if t < start + seconds]

    assert max_in_window(live + replay, 1.0) <= burst + rate  # the API's limit holds
    assert max_in_window(replay, 1.0) <= share * rate + 1
    assert len(replay) <= share * rate * seconds + 1
    assert len(replay) >= 0.6 * share * rate * seconds  # the replay makes progress ...
    assert len(live) >= 0.85 * (1 - share) * rate * seconds  # ... and live keeps the rest


async def test_replay_takes_its_share_of_a_quota_and_leaves_live_the_rest(make: Factory) -> None:
    limiter = make(apis(("geo", "1000/s", 100, ["100/day"])), retry_cap=0.3)
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire("geo") for _ in range(40))), 2)
    lane = Lane("r1", 0.5)  # its cap: floor(0.5 x the 60 left) = 30
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire("geo", lane) for _ in range(30))), 2)
    held = asyncio.create_task(limiter.acquire("geo", lane))
    assert await still_waiting(held, 0.4)
    refused = await limiter._decide("geo", lane)
    assert (refused.granted, refused.reason) == (False, "replay-quota:day")
    day_end = period_bounds("day", time.time())[1]
    assert abs(refused.wait - (day_end - time.time())) < 2
    assert await limiter.replay_usage("geo", "r1") == {"day": {"cap": 30, "used": 30}}
    assert [q.remaining for q in (await limiter.usage("geo")).quotas] == [30]

    await asyncio.wait_for(asyncio.gather(*(limiter.acquire("geo") for _ in range(30))), 2)
    spent = await limiter._decide("geo", None)
    assert (spent.granted, spent.reason) == (False, "quota:day")
    assert [q.used for q in (await limiter.usage("geo")).quotas] == [100]
    assert not held.done()
    held.cancel()


async def test_replays_have_independent_buckets_and_caps(make: Factory) -> None:
    limiter = make(apis(("geo", "40/s", 4, ()), ("paid", "1000/s", 100, ["100/day"])))
    loop = asyncio.get_running_loop()
    start = loop.time()
    # Each replay has its own burst of 1 (decided, not timed: a busy machine is slow to connect) ...
    assert (await limiter._decide("geo", Lane("a", 0.25))).granted
    assert (await limiter._decide("geo", Lane("b", 0.25))).granted
    await limiter.acquire("geo", Lane("a", 0.25))  # ... and waits 0.1 s for its next slot
    assert 0.08 <= loop.time() - start <= 0.5

    a, b = Lane("a", 0.5), Lane("b", 0.5)
    await asyncio.gather(*(limiter.acquire("paid", a) for _ in range(10)))  # cap 50 of 100
    await limiter.acquire("paid", b)  # cap: half of the 90 left
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire("paid", a) for _ in range(40))), 2)
    assert (await limiter._decide("paid", a)).reason == "replay-quota:day"
    await asyncio.wait_for(limiter.acquire("paid", b), 1)  # b is not held by a's cap
    assert await limiter.replay_usage("paid", "a") == {"day": {"cap": 50, "used": 50}}
    assert await limiter.replay_usage("paid", "b") == {"day": {"cap": 45, "used": 2}}
    assert await limiter.replay_usage("paid", "c") == {}


async def test_a_replay_waiter_holds_its_seat_only_once_granted(make: Factory) -> None:
    limiter = make(apis(("geo", "20/s", 2, ())))
    seat = asyncio.BoundedSemaphore(1)  # the API's concurrency, say
    lane = Lane("r1", 0.05)  # 1/s, burst 1: its next slot comes 1 s after this one
    await limiter.acquire("geo", lane, seat)
    assert seat.locked()  # handed over with the token ...
    seat.release()  # ... and given back by the caller after its call
    refused = asyncio.create_task(limiter.acquire("geo", lane, seat))
    assert await still_waiting(refused, 0.05)
    # refused, it waits without the seat, so a live call takes it meanwhile
    await asyncio.wait_for(limiter.acquire("geo", None, seat), 0.5)
    assert not refused.done()
    seat.release()
    await asyncio.wait_for(refused, 2)
    assert seat.locked()
    seat.release()

    cancelled = asyncio.create_task(limiter.acquire("geo", lane, seat))  # refused, then cancelled
    assert await still_waiting(cancelled, 0.05)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    await asyncio.gather(*(limiter.acquire("geo") for _ in range(3)))  # the burst and one more
    reserved = asyncio.create_task(limiter.acquire("geo", None, seat))  # its slot is 0.1 s away
    await asyncio.sleep(0)
    reserved.cancel()  # deciding or sleeping until its slot: the seat comes back either way
    await asyncio.gather(reserved, return_exceptions=True)
    assert not seat.locked()


async def test_a_live_waiter_takes_its_seat_first_and_gives_it_back_if_cancelled(
    make: Factory,
) -> None:
    limiter = make(apis(("geo", "100/s", 1, ["1/day"])), retry_cap=0.1)
    await limiter.acquire("geo")  # the day's quota is spent: every later call is refused
    seat = asyncio.BoundedSemaphore(1)
    waiting = asyncio.create_task(limiter.acquire("geo", None, seat))
    assert await still_waiting(waiting, 0.05)
    assert seat.locked()  # held while refused: every live call of the API is refused alike
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not seat.locked()


async def test_refused_live_waiters_ask_a_few_at_a_time(make: Factory) -> None:
    limiter = make(apis(("geo", "100/s", 1, ["1/day"])), retry_cap=0.1)
    await limiter.acquire("geo")  # the day's quota is spent: every later call is refused
    decide, decisions = limiter._decide, 0

    async def counted(api: str, lane: Lane | None) -> Decision:
        nonlocal decisions
        decisions += 1
        return await decide(api, lane)

    limiter._decide = counted  # type: ignore[method-assign]
    waiters = [asyncio.create_task(limiter.acquire("geo")) for _ in range(200)]
    await asyncio.sleep(0.5)  # a rate of decisions over time: nothing to await instead
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    # 32 askers each retrying every 0.1 s (the cap) make about 200 decisions; all 200 waiters
    # retrying would make about 1,200
    assert LIVE_ASKERS <= decisions <= 8 * LIVE_ASKERS


async def test_local_fallback_gives_a_replay_its_share_of_the_local_share() -> None:
    local = LocalFallback(apis(("geo", "80/s", 8, ["40/day"])), 0.25, time.time)
    lane = Lane("r1", 0.5)  # locally 80 x 0.25 x 0.5 = 10/s, burst 1; 5 of the 10 local units
    loop = asyncio.get_running_loop()
    start = loop.time()
    granted = [await local.decide("geo", lane) for _ in range(5)]
    assert all(d.granted for d in granted)
    assert 0.35 <= loop.time() - start <= 0.6
    assert (await local.decide("geo", lane)).reason == "replay-quota:day"
    live = [await local.decide("geo") for _ in range(5)]  # live keeps the other 5
    assert all(d.granted for d in live)
    assert (await local.decide("geo")).reason == "quota:day"
    assert sum(local.take_replay_counts().values()) == 5
    assert sum(local.take_counts().values()) == 10


async def test_memory_quota_holds_until_the_month_resets() -> None:
    now = [datetime(2024, 1, 31, 23, 59, 58, tzinfo=UTC).timestamp()]
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    limiter = MemoryLimiter(
        apis=apis(("geo", "10/s", 2, ["2/month"])), clock=lambda: now[0], sleep=fake_sleep
    )
    await limiter.acquire("geo")
    await limiter.acquire("geo")
    await limiter.acquire("geo")  # held until 2024-02-01T00:00:00Z
    assert (
        datetime(2024, 2, 1, tzinfo=UTC).timestamp()
        <= now[0]
        < datetime(2024, 2, 1, 0, 0, 1, tzinfo=UTC).timestamp()
    )
    assert len(sleeps) <= 4  # slept to the reset, in capped steps: no busy loop


async def test_a_replay_held_by_its_quota_share_is_told_when_held_and_when_it_goes_on() -> None:
    now = [datetime(2024, 1, 31, 23, 59, 58, tzinfo=UTC).timestamp()]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = MemoryLimiter(
        apis=apis(("geo", "10/s", 2, ["4/day"])), clock=lambda: now[0], sleep=fake_sleep
    )
    told: list[tuple[str, str, str | None]] = []

    async def on_hold(api: str, lane: Lane, reason: str | None) -> None:
        told.append((api, lane.replay_id, reason))

    limiter.on_replay_hold = on_hold
    lane = Lane("r1", 0.5)  # its cap: 2 of the day's 4
    seat = asyncio.BoundedSemaphore(1)
    for _ in range(3):  # the third waits for the next day
        await limiter.acquire("geo", lane, seat)
        seat.release()
    assert told == [("geo", "r1", "replay-quota:day"), ("geo", "r1", None)]
    assert now[0] >= datetime(2024, 2, 1, tzinfo=UTC).timestamp()


async def test_memory_shadow_counts_what_its_twin_counts() -> None:
    now = [0.0]
    shadowed = MemoryLimiter(apis=apis(("geo", "50/s", 5, ())), clock=lambda: now[0])
    plain = MemoryLimiter(apis=apis(("geo", "50/s", 5, ())), clock=lambda: now[0])
    await shadowed.set_overrides("geo", shadow_rate=5.0, shadow_burst=2)
    slots = []
    for moment in arrivals(300, 80.0):
        now[0] = moment
        decision = shadowed.decide("geo")
        assert decision == plain.decide("geo")  # the shadow enforces nothing
        if decision.granted:
            slots.append(moment + decision.wait)
    expected = shadow_twin(slots, 5.0, 2)
    assert (await shadowed.usage("geo")).shadow == ShadowUsage(5.0, 2, expected, len(slots))
    assert 0 < expected < len(slots)
    await shadowed.set_overrides("geo", shadow_rate=2.0)  # a new shadow: a new count
    assert (await shadowed.usage("geo")).shadow == ShadowUsage(2.0, 2, 0, 0)
    await shadowed.reset_overrides("geo")
    assert (await shadowed.usage("geo")).shadow is None


# --- Redis only ------------------------------------------------------------------------------


async def test_a_bulk_decides_as_the_same_calls_one_after_another(
    redis_client: aioredis.Redis,
) -> None:
    script = redis_client.register_script(load_script("acquire.lua"))
    limits, now_us = Limits(10.0, 3, {"day": 100}), 1_700_000_000_000_000
    replies: dict[str, list[Any]] = {}
    for app_id, bulk in (("single", False), ("bulk", True)):
        await redis_client.set(Keys.of(app_id, "geo").epoch, now_us)  # no fail-closed start
        keys, sight, replies[app_id] = Keys.of(app_id, "geo").acquire(), "", []
        if bulk:
            args = [*acquire_args(limits, 0.15, now_us, sight=sight), "6"]
            replies[app_id] = await script(keys=keys, args=args)
            continue
        for _ in range(6):
            reply = await script(keys=keys, args=acquire_args(limits, 0.15, now_us, sight=sight))
            replies[app_id].append(reply)
            if parse_reply(reply).granted:
                sight = reply_sight(reply)
    single = [parse_reply(r) for r in replies["single"]]
    bulk = [parse_reply(r) for r in replies["bulk"]]
    # burst 3 and 0.15 s of waiting at 10/s: four grants, then refusals; the bulk stops at the
    # first refusal, which the callers after it share
    assert [d.granted for d in single] == [True] * 4 + [False] * 2
    assert bulk == single[:5]
    assert [d.grant for d in bulk[:4]] == [1, 2, 3, 4]
    assert bulk[3].remaining == {"day": 96}


async def test_redis_shadow_counts_what_its_twin_counts(redis_client: aioredis.Redis) -> None:
    script = redis_client.register_script(load_script("acquire.lua"))
    await set_overrides(redis_client, "shadow", "geo", shadow_rate=5.0, shadow_burst=2)
    shadowed, plain = Keys.of("shadow", "geo"), Keys.of("shadow", "plain")
    slots: list[float] = []
    for moment in arrivals(300, 80.0):
        now_us = round(moment * 1e6)
        args = acquire_args(Limits(50.0, 5), 1.0, now_us)
        decision = parse_reply(await script(keys=shadowed.acquire(), args=args))
        assert decision == parse_reply(await script(keys=plain.acquire(), args=args))
        if decision.granted:
            slots.append(now_us + round(decision.wait * 1e6))
    expected = shadow_twin(slots, 5.0, 2, interval=200_000)  # µs, as the script counts
    assert 0 < expected < len(slots)
    tat, delayed, calls = shadowed.shadow
    assert [await redis_client.get(delayed), await redis_client.get(calls)] == [
        str(expected).encode(),
        str(len(slots)).encode(),
    ]
    for key in (delayed, calls, shadowed.overrides):  # the counters live as long as the shadow
        assert 2_500_000_000 < await redis_client.pttl(key) <= 2_592_000_000, key
    assert await redis_client.pttl(tat) > 0
    assert await redis_client.exists(*plain.shadow) == 0

    geo = apis(("geo", "50/s", 5, ()))["geo"]
    usage = await read_usage(redis_client, "shadow", geo)
    assert usage.shadow == ShadowUsage(5.0, 2, expected, len(slots))
    assert usage.as_dict()["shadow"] == {
        "rate_per_second": 5.0,
        "burst": 2,
        "delayed": expected,
        "calls": len(slots),
    }
    await reset_overrides(redis_client, "shadow", "geo")
    assert await redis_client.exists(*shadowed.shadow) == 0
    assert (await read_usage(redis_client, "shadow", geo)).shadow is None


async def test_server_budget_is_shared_and_lives_until_the_servers_reset(
    make_redis: Callable[..., RedisLimiter], redis_client: aioredis.Redis
) -> None:
    first, second = (make_redis(apis(("geo", "100/s", 10, ()))) for _ in range(2))
    grants = [await first.acquire("geo") for _ in range(3)]
    assert grants == [1, 2, 3]
    await first.server_signal("geo", 4, 1.0, grants[0])  # 2 and 3 may not be counted yet
    keys = Keys.of("test", "geo")
    assert await redis_client.hget(keys.server_budget, "limit") == b"5"
    assert 900 < await redis_client.pttl(keys.server_budget) <= 1000
    assert await redis_client.pttl(keys.granted) > 31 * 86_400_000
    decisions = [await second._decide("geo", None) for _ in range(3)]  # every worker follows
    assert [d.grant for d in decisions] == [4, 5, None] and decisions[2].reason == "server"
    assert decisions[0].rate == pytest.approx(2.0, rel=0.05)  # 2 left over 1 s
    assert 0.45 <= decisions[1].wait <= 0.55  # one interval of 0.5 s after the first


async def test_limits_cli_sets_shows_and_resets_a_shadow(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis
) -> None:
    config = config_from_dict(
        {
            "app_id": "cli",
            "redis": {"url": redis_server.url},
            "apis": {"geo": {"url": "http://127.0.0.1/x", "rate": "50/s"}},
        }
    )
    await set_limits(config, "geo", shadow_rate="5/s")
    text = await show_limits(config)
    assert "geo: rate 50/s, burst 50" in text
    assert "shadow rate 5/s, burst 5 (not enforced): would have delayed 0 of 0 calls" in text
    shown = json.loads(await show_limits(config, as_json=True))["apis"][0]
    assert shown["shadow"] == {"rate_per_second": 5.0, "burst": 5, "delayed": 0, "calls": 0}
    assert (shown["rate_per_second"], shown["server"]) == (50.0, None)
    await set_limits(config, "geo", shadow_rate="120/m", shadow_burst=1)
    assert "shadow rate 2/s, burst 1 " in await show_limits(config)
    with pytest.raises(BadArgument, match="--shadow-burst"):
        await set_limits(config, "geo", shadow_burst=3)
    with pytest.raises(BadArgument, match="--shadow-rate"):
        await set_limits(config, "geo", shadow_rate="fast")
    await reset_limits(config, "geo")
    assert json.loads(await show_limits(config, as_json=True))["apis"][0]["shadow"] is None


async def test_several_workers_share_one_limit(make_redis: Callable[..., RedisLimiter]) -> None:
    rate, burst = 50, 5
    workers = [make_redis(apis(("geo", f"{rate}/s", burst, ()))) for _ in range(3)]
    start = asyncio.get_running_loop().time()
    per_worker = await asyncio.gather(*(timed_acquires(w, "geo", 25) for w in workers))
    times = sorted(t for worker_times in per_worker for t in worker_times)
    assert max_in_window(times, 1.0) <= burst + rate
    expected = (len(times) - burst) / rate
    assert expected - 0.02 <= times[-1] - start <= expected + 0.3
    # nobody is starved: every worker is granted calls well before the run ends
    assert all(ts[0] - start < 0.8 * expected for ts in per_worker)


async def test_block_from_one_worker_delays_the_others(
    make_redis: Callable[..., RedisLimiter],
) -> None:
    first, second = (make_redis(apis(("geo", "100/s", 10, ()))) for _ in range(2))
    await first.block("geo", 0.4)
    started = time.monotonic()
    await asyncio.wait_for(second.acquire("geo"), 2)
    assert 0.35 <= time.monotonic() - started <= 0.8


async def test_every_key_has_a_ttl(
    make_redis: Callable[..., RedisLimiter], redis_client: aioredis.Redis
) -> None:
    quotas = ["100/minute", "1000/hour", "10000/day", "100000/month"]
    limiter = make_redis(apis(("geo", "100/s", 10, quotas)))
    for _ in range(5):
        await limiter.acquire("geo")
    await limiter.set_overrides("geo", rate=50.0, quotas={"day": 500})
    await limiter.acquire("geo")
    await limiter.acquire("geo", Lane("r1", 0.5))
    await limiter.block("geo", 5)

    keys = sorted([k.decode() async for k in redis_client.scan_iter("*")])
    prefix = "enricher:{test:geo}:"
    stamps = [period_bounds(p, time.time())[2] for p in ("minute", "hour", "day", "month")]
    assert {k.removeprefix(prefix).split(":", 2)[0] for k in keys} == {
        "tat",
        "blocked",
        "overrides",
        "quota",
        "replay",
        "granted",
    }
    assert len(keys) == 9 + 9 and all(k.startswith(prefix) for k in keys)
    assert prefix + "quota:epoch" in keys
    assert any(k.endswith(stamps[2]) for k in keys)
    replay_keys = [k.removeprefix(prefix + "replay:r1:") for k in keys if ":replay:" in k]
    periods = zip(PERIODS, stamps, strict=True)
    expected = ["tat"] + [f"{kind}:{p}:{st}" for p, st in periods for kind in ("cap", "used")]
    assert sorted(replay_keys) == sorted(expected)
    for key in keys:
        assert await redis_client.pttl(key) > 0, key


CALENDAR_CASES = [
    "2024-02-29T23:59:59.999999",
    "2024-02-28T23:59:59",
    "2023-02-28T23:59:59.5",
    "2023-12-31T23:59:59.999999",
    "2024-01-01T00:00:00",
    "2000-02-29T12:00:00",
    "2100-02-28T23:30:00",
    "1999-12-31T23:59:59",
    "2025-06-30T23:59:59.999999",
    "1970-01-01T00:00:00",
]


def _random_moments(n: int) -> list[str]:
    rng = random.Random(7)
    low, high = 0, datetime(2200, 1, 1, tzinfo=UTC).timestamp()
    moments = (rng.uniform(low, high) for _ in range(n))
    return [datetime.fromtimestamp(m, UTC).replace(tzinfo=None).isoformat() for m in moments]


@pytest.mark.parametrize("moment", CALENDAR_CASES + _random_moments(10))
async def test_lua_calendar_periods_match_the_python_twin(
    redis_client: aioredis.Redis, moment: str
) -> None:
    script = redis_client.register_script(load_script("acquire.lua"))
    at = datetime.fromisoformat(moment).replace(tzinfo=UTC)
    now_us = int(at.timestamp()) * 1_000_000 + at.microsecond
    periods: tuple[QuotaPeriod, ...] = ("minute", "hour", "day", "month")
    for period in periods:
        keys = Keys.of("cal", f"{period}-{moment}")
        args = acquire_args(Limits(1000.0, 10, {period: 1}), 1.0, now_us)
        key_list = [keys.tat, keys.blocked, keys.overrides, keys.quota_prefix]
        granted = parse_reply(await script(keys=key_list, args=args))
        assert (granted.granted, dict(granted.remaining)) == (True, {period: 0})

        _, end, stamp = period_bounds(period, now_us / 1e6)
        quota_key = keys.quota(period, stamp)
        assert await redis_client.get(quota_key) == b"1"
        expected_ttl_ms = (end * 1e6 - now_us) / 1000 + 60_000
        assert abs(await redis_client.pttl(quota_key) - expected_ttl_ms) < 1500

        refused = parse_reply(await script(keys=key_list, args=args))
        assert (refused.granted, refused.reason) == (False, f"quota:{period}")
        assert refused.wait == math.ceil(end * 1e6 - now_us) / 1e6

        # A replay's cap and use live in the same calendar period (half of 4 left: 2).
        keys = Keys.of("cal", f"replay-{period}-{moment}")
        args = acquire_args(Limits(1000.0, 10, {period: 4}), 1.0, now_us, share=0.5)
        for _ in range(2):
            replayed = parse_reply(await script(keys=keys.acquire("r"), args=args))
            assert replayed.granted
        for key in (keys.replay_cap("r", period, stamp), keys.replay_used("r", period, stamp)):
            assert await redis_client.get(key) == b"2"
            assert abs(await redis_client.pttl(key) - expected_ttl_ms) < 1500
        assert await redis_client.pttl(keys.replay_tat("r")) > 0
        refused = parse_reply(await script(keys=keys.acquire("r"), args=args))
        assert (refused.granted, refused.reason) == (False, f"replay-quota:{period}")
        assert refused.wait == math.ceil(end * 1e6 - now_us) / 1e6
        assert dict(refused.remaining) == {period: 2}  # live keeps the other half


def test_python_calendar_twin() -> None:
    def bounds(period: QuotaPeriod, moment: str) -> tuple[str, str, str]:
        start, end, stamp = period_bounds(period, datetime.fromisoformat(moment).timestamp())
        iso = [datetime.fromtimestamp(t, UTC).isoformat()[:19] for t in (start, end)]
        return iso[0], iso[1], stamp

    feb = bounds("month", "2024-02-29T23:59:59.9+00:00")
    assert feb == ("2024-02-01T00:00:00", "2024-03-01T00:00:00", "2024-02")
    dec = bounds("month", "2023-12-31T23:59:59+00:00")
    assert dec == ("2023-12-01T00:00:00", "2024-01-01T00:00:00", "2023-12")
    day = bounds("day", "2100-02-28T23:00:00+00:00")
    assert day == ("2100-02-28T00:00:00", "2100-03-01T00:00:00", "2100-02-28")
    hour = bounds("hour", "2024-03-31T01:30:00+00:00")  # DST change dates do not matter: UTC
    assert hour == ("2024-03-31T01:00:00", "2024-03-31T02:00:00", "2024-03-31T01")
    minute = bounds("minute", "2024-01-01T00:00:59.999+00:00")
    assert minute == ("2024-01-01T00:00:00", "2024-01-01T00:01:00", "2024-01-01T00:00")


async def test_pause_mode_makes_no_call_while_redis_is_down(
    own_server: EmbeddedRedis,
    make_redis: Callable[..., RedisLimiter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = make_redis(apis(("geo", "100/s", 10, ())), url=own_server.url, retry_cap=0.5)
    await limiter.acquire("geo")
    own_server.stop()
    caplog.set_level(logging.WARNING, logger="enricher.limiter")
    waiters = [asyncio.create_task(limiter.acquire("geo")) for _ in range(5)]
    waiters.append(asyncio.create_task(limiter.acquire("geo", Lane("r1", 0.5))))
    done, _ = await asyncio.wait(waiters, timeout=1.0)
    assert not done  # no token, no call (replays included)

    restarted_at = time.monotonic()
    await asyncio.to_thread(own_server.start)
    await asyncio.wait_for(asyncio.gather(*waiters), 4)
    assert time.monotonic() - restarted_at < 3.0  # resumed by itself
    messages = [r.getMessage() for r in caplog.records if r.name == "enricher.limiter"]
    assert sum("unreachable" in m for m in messages) == 1  # once per outage, not per call
    assert sum("reachable again" in m for m in messages) == 1


async def test_local_mode_calls_at_the_local_share_while_redis_is_down(
    own_server: EmbeddedRedis, make_redis: Callable[..., RedisLimiter]
) -> None:
    specs = apis(("geo", "40/s", 40, ["40/day"]), ("fast", "40/s", 40, ()))
    limiter = make_redis(
        specs, url=own_server.url, on_unavailable="local", local_share=0.25, retry_cap=0.3
    )
    await asyncio.gather(*(limiter.acquire("geo") for _ in range(20)))  # 20 of 40 left
    own_server.stop()

    # Rate: 40/s x 0.25 = 10/s, at most 10 at once.
    start = asyncio.get_running_loop().time()
    times = await asyncio.wait_for(timed_acquires(limiter, "fast", 20), 5)
    assert 0.8 <= times[-1] - start <= 1.6
    assert max_in_window(times, 0.5) <= 16
    # Quota: a quarter of the 20 remaining when Redis was last seen; a replay with a share of
    # 0.5 gets half of that quarter (2), live calls the rest.
    lane = Lane("r1", 0.5)
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire("geo", lane) for _ in range(2))), 1)
    held_replay = asyncio.create_task(limiter.acquire("geo", lane))
    await asyncio.wait_for(asyncio.gather(*(limiter.acquire("geo") for _ in range(3))), 1)
    sixth = asyncio.create_task(limiter.acquire("geo"))
    assert await still_waiting(sixth, 0.5)
    assert not held_replay.done()

    await asyncio.to_thread(own_server.start)  # empty: nothing was persisted
    await asyncio.wait_for(asyncio.gather(sixth, held_replay), 4)
    client = aioredis.Redis.from_url(own_server.url)
    try:
        keys, stamp = Keys.of("test", "geo"), period_bounds("day", time.time())[2]
        key = keys.quota("day", stamp)
        # Redis came back empty: the worker's last sight restored the 20 calls made before the
        # outage, the 5 local calls were added back, then 2 more.
        assert await client.get(key) == b"27"
        assert await client.pttl(key) > 0
        used = keys.replay_used("r1", "day", stamp)
        assert await client.get(used) == b"3"  # the replay's 2 local calls, then 1 more
        assert await client.pttl(used) > 0
    finally:
        await client.aclose()
