"""Recovery from lost limiter state (Redis restarted empty, flushed, rolled back): the bucket fails
closed past every reservation made before the loss, and quota counters come back from the
workers' sights (``lua/acquire.lua``, "Recovery from lost state"). Each test owns its
redis-server, so it may wipe it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from enricher.config import ApiSettings
from enricher.limiter import RedisLimiter, acquire_args, parse_reply, reply_sight
from enricher.quota import Keys, Limits, load_script, newer_sight, period_bounds
from enricher.services import EmbeddedRedis

RATE, BURST = 50, 10
INTERVAL = 1_000_000 // RATE  # µs
MAX_WAIT_US = 1_000_000
T0 = 1_800_000_000_000_000  # a fake Redis time, µs


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as own:
        yield own


@pytest.fixture
async def client(server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    own = aioredis.Redis.from_url(server.url)
    yield own
    await own.aclose()


def geo(quotas: Sequence[str] = ()) -> dict[str, ApiSettings]:
    spec = {"name": "geo", "url": "http://127.0.0.1/x", "rate": f"{RATE}/s", "burst": BURST}
    return {"geo": ApiSettings.model_validate({**spec, "quotas": list(quotas)})}


def gcra_excess(slots: Sequence[int], slack: int = 0) -> int:
    """Calls among ``slots`` (µs) a GCRA policer of the API's rate and burst would refuse, each
    allowed to arrive up to ``slack`` µs early."""
    tat, excess, interval = 0, 0, INTERVAL
    for slot in sorted(slots):
        if slot + slack < tat - (BURST - 1) * interval:
            excess += 1
        else:
            tat = max(tat, slot) + interval
    return excess


async def scripted_demand(client: aioredis.Redis, *, recover: bool) -> list[int]:
    """Three workers asking 600 times a second for 3 s (fake Redis time); Redis is wiped at 1 s
    and 2 s. The granted slots, µs."""
    script = client.register_script(load_script("acquire.lua"))
    keys = Keys.of("loss", "geo").acquire()
    sights = ["", "", ""]
    slots: list[int] = []
    for step in range(600):
        now = T0 + step * 5_000
        if step in (200, 400):
            await client.flushall()
        for worker in range(3):
            sight = sights[worker] if recover else None
            args = acquire_args(Limits(float(RATE), BURST), 1.0, now, sight=sight)
            reply = await script(keys=keys, args=args)
            sights[worker] = newer_sight(sights[worker], reply_sight(reply))
            decision = parse_reply(reply)
            if decision.granted:
                slots.append(now + round(decision.wait * 1e6))
    return slots


async def test_a_wipe_cannot_overlap_reservations_made_before_it(client: aioredis.Redis) -> None:
    unguarded = await scripted_demand(client, recover=False)
    assert gcra_excess(unguarded) > 50  # the bug: fresh buckets next to old reservations
    await client.flushall()
    slots = await scripted_demand(client, recover=True)
    assert gcra_excess(slots) == 0
    # Each new epoch costs at most max_wait + burst / rate of calls, the first start included.
    # Under saturation the new epoch runs on right after the old reservations: no gap.
    assert len(slots) >= RATE * 3 - 5


async def test_flushall_under_load_keeps_the_rate(
    server: EmbeddedRedis, client: aioredis.Redis
) -> None:
    """Real time: three workers saturate the API while Redis is flushed twice."""
    limiters = [
        RedisLimiter(redis=aioredis.Redis.from_url(server.url), app_id="loss", apis=geo())
        for _ in range(3)
    ]
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def caller(limiter: RedisLimiter) -> None:
        while True:
            await limiter.acquire("geo")
            times.append(loop.time())

    callers = [asyncio.create_task(caller(limiters[i % 3])) for i in range(60)]
    try:
        for _ in range(2):
            await asyncio.sleep(1.5)  # reservations up to max_wait ahead are outstanding
            await client.flushall()
        await asyncio.sleep(1.5)
    finally:
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        for limiter in limiters:
            await limiter.close()
            await limiter._redis.aclose()
    # Grant times are measured after each caller's sleep: allow 20 ms of scheduling noise.
    assert gcra_excess([round(t * 1e6) for t in times], slack=20_000) == 0
    assert len(times) >= 100  # calls went on after each wipe


async def test_quota_counters_come_back_from_the_workers_sights(
    server: EmbeddedRedis, client: aioredis.Redis
) -> None:
    apis = geo(["1000/day"])
    first, second = (
        RedisLimiter(redis=aioredis.Redis.from_url(server.url), app_id="loss", apis=apis)
        for _ in range(2)
    )
    try:
        await asyncio.gather(*(first.acquire("geo") for _ in range(10)))
        await asyncio.gather(*(second.acquire("geo") for _ in range(20)))  # second saw 30
        await client.flushall()
        await first.acquire("geo")  # restores first's 10, then one more
        assert await day_used(client) == 11
        await second.acquire("geo")  # restores second's 30, keeps first's one since: 32
        assert [q.used for q in (await first.usage("geo")).quotas] == [32]
        await first.acquire("geo")  # an older sight never lowers nor double-counts
        assert await day_used(client) == 33
        keys = [key async for key in client.scan_iter("*")]
        assert any(key.endswith(b":base") for key in keys)
        for key in keys:
            assert await client.pttl(key) > 0, key
    finally:
        for limiter in (first, second):
            await limiter.close()
            await limiter._redis.aclose()


async def test_a_rollback_is_detected_and_fails_closed(
    server: EmbeddedRedis, client: aioredis.Redis
) -> None:
    """Redis rolled back to an older state (a snapshot, a lagging replica): the worker's sight
    holds more grants than the counter."""
    limiter = RedisLimiter(
        redis=aioredis.Redis.from_url(server.url), app_id="loss", apis=geo(["1000/day"])
    )
    keys = Keys.of("loss", "geo")
    try:
        await asyncio.gather(*(limiter.acquire("geo") for _ in range(20)))
        epoch = await client.get(keys.epoch)
        await client.set(keys.granted, 5)  # the state as it was 15 grants ago
        await client.set(day_key(keys), 5)
        await client.delete(keys.tat)
        started = time.monotonic()
        await limiter.acquire("geo")
        assert time.monotonic() - started >= 0.9  # held past max_wait: fail closed
        assert await client.get(keys.epoch) != epoch
        assert await day_used(client) == 21
        assert int(await client.get(keys.granted) or 0) == 21
    finally:
        await limiter.close()
        await limiter._redis.aclose()


async def test_first_start_waits_once_then_runs_at_the_rate(client: aioredis.Redis) -> None:
    script = client.register_script(load_script("acquire.lua"))
    keys = Keys.of("first", "geo").acquire()

    async def ask(now: int, sight: str) -> tuple[Any, str]:
        reply = await script(keys=keys, args=acquire_args(Limits(50.0, 10), 1.0, now, sight=sight))
        return parse_reply(reply), reply_sight(reply)

    decision, sight = await ask(T0, "")
    assert (decision.granted, decision.reason) == (False, "rate")
    assert decision.wait == pytest.approx(INTERVAL / 1e6)  # 1 s + 10 intervals: 1.02 s out
    decision, sight = await ask(T0 + INTERVAL, sight)
    assert decision.granted and decision.wait == pytest.approx(1.0)
    for step in range(2, 5):  # later calls run at the rate, with no second penalty
        decision, sight = await ask(T0 + step * INTERVAL, sight)
        assert decision.granted and decision.wait == pytest.approx(1.0)
    epoch, grants = sight.split()
    assert (int(epoch), int(grants)) == (T0, 4)
    assert await client.pttl(Keys.of("first", "geo").epoch) > 6 * 86_400_000


def test_newer_sight_orders_by_epoch_then_grants() -> None:
    old, later = "100 7 day=2026-11-29=7", "100 9 day=2026-11-29=9"
    assert newer_sight("", old) == old
    assert newer_sight(later, old) == later  # a late reply to an earlier decision
    assert newer_sight(old, later) == later
    assert newer_sight(later, "200 1 day=2026-11-29=3") == "200 1 day=2026-11-29=3"
    assert newer_sight(later, "") == later


def day_key(keys: Keys) -> str:
    return keys.quota("day", period_bounds("day", time.time())[2])


async def day_used(client: aioredis.Redis) -> int:
    return int(await client.get(day_key(Keys.of("loss", "geo"))) or 0)
