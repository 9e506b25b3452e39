"""The API's own rate-limit headers: parsing every common form, then a fleet (two callers, each
with its own RedisLimiter) that follows a server whose remaining calls drop faster than our bucket
would spend them, and slows down before the server ever answers 429."""

from __future__ import annotations

import asyncio
import bisect
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDict

from enricher.caller import ApiCaller
from enricher.config import ApiSettings
from enricher.errors import CallError
from enricher.limiter import RedisLimiter
from enricher.sandbox import SandboxSettings, run_sandbox
from enricher.services import EmbeddedRedis
from enricher.signals import MAX_RESET, RateSignal, read_signal

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
EPOCH = int(NOW.timestamp())


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # X-RateLimit-*: reset as delta seconds, epoch seconds or epoch milliseconds
        (
            {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "42", "X-RateLimit-Reset": "30"},
            RateSignal(42, 30.0, 100),
        ),
        ({"x-ratelimit-remaining": "7", "x-ratelimit-reset": "2.5"}, RateSignal(7, 2.5)),
        (
            {"X-RateLimit-Remaining": "10", "X-RateLimit-Reset": str(EPOCH + 90)},
            RateSignal(10, 90.0),
        ),
        (
            {"X-RateLimit-Remaining": "10", "X-RateLimit-Reset": str((EPOCH + 45) * 1000)},
            RateSignal(10, 45.0),
        ),
        (
            {
                "X-RateLimit-Remaining": "5",
                "X-RateLimit-Reset": str(EPOCH + 100),
                "X-RateLimit-Reset-After": "1.5",
            },
            RateSignal(5, 1.5),
        ),
        ({"X-Rate-Limit-Remaining": "3", "X-Rate-Limit-Reset": "60"}, RateSignal(3, 60.0)),
        ({"X-RateLimit-Remaining": "59, 999", "X-RateLimit-Reset": "60"}, RateSignal(59, 60.0)),
        ({"X-RateLimit-Remaining": "5.7", "X-RateLimit-Reset": "10"}, RateSignal(5, 10.0)),
        ({"X-RateLimit-Remaining": "-3", "X-RateLimit-Reset": "10"}, RateSignal(0, 10.0)),
        (
            {"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": str(1_000_000_000)},
            None,  # an epoch time in the past: no usable reset
        ),
        (
            {"X-RateLimit-Remaining": "100", "X-RateLimit-Reset": "99999999"},
            RateSignal(100, MAX_RESET),
        ),
        # the IETF drafts: early separate fields, the dictionary, and the list of policies
        (
            {"RateLimit-Limit": "10", "RateLimit-Remaining": "4", "RateLimit-Reset": "8"},
            RateSignal(4, 8.0, 10),
        ),
        ({"RateLimit": "limit=100, remaining=50, reset=30"}, RateSignal(50, 30.0, 100)),
        ({"RateLimit": "remaining=0, reset=12"}, RateSignal(0, 12.0)),
        ({"RateLimit": '"default";r=50;t=30'}, RateSignal(50, 30.0)),
        (
            {"RateLimit": '"default";r=50;t=30', "RateLimit-Policy": '"default";q=100;w=60'},
            RateSignal(50, 30.0, 100),
        ),
        (
            {"RateLimit": '"burst";r=50;t=30, "day";r=900;t=3600'},
            RateSignal(900, 3600.0),  # 0.25/s is slower than 1.67/s
        ),
        (
            {"RateLimit": '"hour";r=20', "RateLimit-Policy": '"hour";q=1000;w=3600'},
            RateSignal(20, 3600.0, 1000),  # no t: the policy's window
        ),
        ({"RateLimit": "default;r=3;t=9;pk=:YWJj:"}, RateSignal(3, 9.0)),
        ({"RateLimit": '"a,b";r=2;t=4'}, RateSignal(2, 4.0)),
        # several families: the most restrictive wins
        (
            {
                "X-RateLimit-Remaining": "100",
                "X-RateLimit-Reset": "10",
                "RateLimit": '"default";r=5;t=10',
            },
            RateSignal(5, 10.0),
        ),
        # nothing usable
        ({}, None),
        ({"X-RateLimit-Limit": "100"}, None),
        ({"X-RateLimit-Remaining": "5"}, None),
        ({"X-RateLimit-Remaining": "lots", "X-RateLimit-Reset": "10"}, None),
        ({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "0"}, None),
        ({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "inf"}, None),
        ({"RateLimit": ""}, None),
        ({"RateLimit": ";, ,;"}, None),
        ({"RateLimit": '"default";r=5'}, None),  # no t and no policy
        ({"RateLimit-Policy": '"default";q=100;w=60'}, None),
        ({"Retry-After": "5"}, None),
    ],
)
def test_read_signal(headers: dict[str, str], expected: RateSignal | None) -> None:
    assert read_signal(headers, now=NOW) == expected


def test_read_signal_takes_aiohttp_headers_and_gives_a_pace() -> None:
    headers = CIMultiDict({"x-RATELIMIT-remaining": "6", "X-RateLimit-RESET": "3"})
    signal = read_signal(headers, now=NOW)
    assert signal == RateSignal(6, 3.0) and signal.pace == 2.0


# --- a fleet following a real server ----------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def clients(redis_server: EmbeddedRedis) -> AsyncIterator[list[aioredis.Redis]]:
    made = [aioredis.Redis.from_url(redis_server.url) for _ in range(2)]
    yield made
    for client in made:
        await client.aclose()


def max_in_window(times: list[float], width: float) -> int:
    ordered = sorted(times)
    return max(bisect.bisect_left(ordered, t + width) - i for i, t in enumerate(ordered))


@pytest.mark.parametrize("kind", ["x", "ietf"])
async def test_the_fleet_slows_to_the_servers_pace_before_any_429(
    clients: list[aioredis.Redis], kind: Any
) -> None:
    # The server: 20 calls per 2 s window (10/s) and 429 beyond; our bucket: 40/s, burst 4. The
    # window is larger than the burst plus the 9 calls in flight: before the first answer of a
    # window nothing is known, and a smaller one could be overrun once (README, Rate limits).
    server = await run_sandbox(
        SandboxSettings(window_limit=20, window=2.0, ratelimit_headers=kind), port=0
    )
    api = ApiSettings.model_validate(
        {
            "name": "geo",
            "url": server.url + "/geo/{ip}",
            "rate": "40/s",
            "burst": 4,
            "retry": {"attempts": 1},
        }
    )
    app_id = f"s{uuid.uuid4().hex[:8]}"
    limiters = [RedisLimiter(redis=c, app_id=app_id, apis={"geo": api}) for c in clients]
    sessions = [aiohttp.ClientSession() for _ in clients]
    callers = [
        ApiCaller(apis={"geo": api}, limiter=limiter, session=session)
        for limiter, session in zip(limiters, sessions, strict=True)
    ]
    answered: list[float] = []
    errors: list[CallError] = []

    async def keep_calling(caller: ApiCaller, number: int) -> None:
        while True:
            try:
                await caller.call("geo", {"ip": f"10.0.0.{number}"})
                answered.append(time.monotonic())
            except CallError as exc:
                errors.append(exc)

    loops = [
        asyncio.create_task(keep_calling(caller, 3 * index + n))
        for index, caller in enumerate(callers)
        for n in range(3)
    ]
    try:
        await asyncio.sleep(4.5)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        stats = server.stats()
        for limiter, session in zip(limiters, sessions, strict=True):
            await limiter.close()
            await session.close()
        await server.close()

    assert stats["rejected_429"] == 0 and errors == []
    # Within the server's budget (20 per 2 s window, at most 3 windows touched) yet using at
    # least a whole window of it:
    assert 20 <= len(answered) <= 60
    # Slowed down: never the bucket's 40/s (44 in a second), at most the server's whole window.
    assert max_in_window(answered, 1.0) <= 20
