"""The sandbox API: deterministic answers, its own rate limit, stats, latency and seeded faults."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from enricher import sandbox as sandbox_module
from enricher.sandbox import (
    SandboxServer,
    SandboxSettings,
    fx_answer,
    geo_answer,
    run_sandbox,
    score_answer,
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def serve(settings: SandboxSettings | None = None) -> SandboxServer:
    return await run_sandbox(settings or SandboxSettings(), host="127.0.0.1", port=0)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any, dict[str, str]]:
    async with session.get(url) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, dict(response.headers)


async def statuses(session: aiohttp.ClientSession, urls: list[str]) -> list[int]:
    return [status for status, _, _ in await asyncio.gather(*(get(session, u) for u in urls))]


async def next_wall_second() -> None:
    """Start just after a wall-clock second begins, so a burst of calls lands in one second."""
    now = time.time()
    await asyncio.sleep(math.ceil(now) - now + 0.01)


async def test_answers_are_deterministic(session: aiohttp.ClientSession) -> None:
    one, other = await serve(), await serve()
    try:
        status, body, _ = await get(session, f"{one.url}/geo/10.1.2.3")
        assert status == 200 and body == geo_answer("10.1.2.3")
        assert (await get(session, f"{other.url}/geo/10.1.2.3"))[1] == body  # another server
        assert set(body) == {"ip", "country", "city", "lat", "lon", "asn"}
        cities = {geo_answer(f"10.0.0.{i}")["city"] for i in range(50)}
        assert len(cities) > 3  # different ips, different answers
        assert (await get(session, f"{one.url}/fx/eur/usd"))[1] == fx_answer("EUR", "USD")
        async with session.post(f"{one.url}/score", json={"b": 1, "a": [1, 2]}) as response:
            assert await response.json() == score_answer({"a": [1, 2], "b": 1})
        async with session.post(f"{one.url}/score", data=b"[1, 2]") as response:
            assert response.status == 400
    finally:
        await one.close()
        await other.close()


def test_fx_rates_are_consistent() -> None:
    assert fx_answer("usd", "usd") == {"base": "USD", "quote": "USD", "rate": 1.0}
    via = fx_answer("EUR", "JPY")["rate"] * fx_answer("JPY", "GBP")["rate"]
    assert via == pytest.approx(fx_answer("EUR", "GBP")["rate"], rel=1e-4)


async def test_over_its_rate_it_answers_429_with_retry_after(
    session: aiohttp.ClientSession,
) -> None:
    server = await serve(SandboxSettings(rate=1.0, burst=3))
    try:
        await next_wall_second()
        results = await asyncio.gather(*(get(session, f"{server.url}/geo/{i}") for i in range(10)))
        assert sorted(status for status, _, _ in results) == [200] * 3 + [429] * 7
        for status, _, headers in results:
            if status == 429:
                assert int(headers["Retry-After"]) >= 1
        stats = server.stats()
        assert (stats["calls"], stats["ok"], stats["rejected_429"]) == (10, 3, 7)
        assert stats["max_calls_in_any_second"] == 10  # attempts count, admitted or not
        assert stats["max_admitted_in_any_second"] == 3
        assert sum(stats["calls_per_second"].values()) == 10
    finally:
        await server.close()


async def test_retry_after_can_be_fixed_or_a_date(session: aiohttp.ClientSession) -> None:
    server = await serve(SandboxSettings(rate=0.01, burst=1, retry_after=7.2))
    try:
        codes = await statuses(session, [f"{server.url}/geo/a"])
        status, _, headers = await get(session, f"{server.url}/geo/b")
        assert codes == [200] and status == 429 and headers["Retry-After"] == "8"
        server.update(retry_after_date=True, burst=1)  # a new, full bucket
        await statuses(session, [f"{server.url}/geo/c"])
        _, _, headers = await get(session, f"{server.url}/geo/d")
        when = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
        assert 6 <= when - time.time() <= 9
    finally:
        await server.close()


def test_bucket_refills_at_its_rate() -> None:
    now = [100.0]
    bucket = sandbox_module._Bucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.take(), bucket.take()] == [0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.take() == 0.0 and bucket.take() == pytest.approx(0.5)
    now[0] += 10
    assert [bucket.take(), bucket.take(), bucket.take() > 0] == [0.0, 0.0, True]  # capped


async def test_stats_count_every_call_but_their_own(session: aiohttp.ClientSession) -> None:
    server = await serve()
    try:
        urls = [f"{server.url}/geo/1.1.1.1"] * 2 + [f"{server.url}/geo/2.2.2.2"]
        urls += [f"{server.url}/status/404", f"{server.url}/status/503", f"{server.url}/nope"]
        urls += [f"{server.url}/text/x", f"{server.url}/big/1000"]
        assert await statuses(session, urls) == [200, 200, 200, 404, 503, 404, 200, 200]
        async with session.post(f"{server.url}/score", json={"user": "u1"}) as response:
            assert response.status == 200
        _, over_http, _ = await get(session, f"{server.url}/stats?detail=1")
        assert over_http == server.stats(detail=True)  # /stats itself is not counted
        assert {k: over_http[k] for k in ("calls", "ok", "errors_4xx", "errors_5xx")} == {
            "calls": 9,
            "ok": 6,
            "errors_4xx": 2,
            "errors_5xx": 1,
        }
        paths = over_http["paths"]
        assert paths["/geo/1.1.1.1"] == 2 and paths["/geo/2.2.2.2"] == 1
        assert paths['/score {"user": "u1"}'] == 1
        assert over_http["paths_seen_count"] == len(paths) == 8
        assert over_http["paths_ok"]["/geo/1.1.1.1"] == 2 and "/status/503" not in paths_ok(server)
        async with session.post(f"{server.url}/stats/reset") as response:
            assert response.status == 200
        assert server.stats()["calls"] == 0 and server.stats()["calls_per_second"] == {}
    finally:
        await server.close()


def paths_ok(server: SandboxServer) -> dict[str, int]:
    return dict(server.stats(detail=True)["paths_ok"])


async def test_max_concurrent_and_latency(session: aiohttp.ClientSession) -> None:
    server = await serve(SandboxSettings(latency=0.2))
    try:
        started = time.monotonic()
        assert await statuses(session, [f"{server.url}/geo/{i}" for i in range(5)]) == [200] * 5
        elapsed = time.monotonic() - started
        assert 0.2 <= elapsed < 0.6  # in parallel, each delayed once
        assert server.stats()["max_concurrent"] == 5 and server.stats()["in_flight"] == 0
    finally:
        await server.close()


async def test_latency_range_and_per_path_delay(session: aiohttp.ClientSession) -> None:
    slow = {"/geo/slow": 0.3}
    server = await serve(SandboxSettings(latency=(0.05, 0.1), path_latency=slow))
    try:
        for path, low, high in (("/geo/a", 0.05, 0.3), ("/geo/slow", 0.35, 0.6)):
            started = time.monotonic()
            await get(session, f"{server.url}{path}")
            assert low <= time.monotonic() - started < high, path
    finally:
        await server.close()


async def fault_sequence(session: aiohttp.ClientSession, settings: SandboxSettings) -> list[int]:
    server = await serve(settings)
    try:
        return [(await get(session, f"{server.url}/geo/{i}"))[0] for i in range(300)]
    finally:
        await server.close()


async def test_error_rate_is_about_right_and_seeded(session: aiohttp.ClientSession) -> None:
    first = await fault_sequence(session, SandboxSettings(error_rate=0.3, seed=7))
    again = await fault_sequence(session, SandboxSettings(error_rate=0.3, seed=7))
    other = await fault_sequence(session, SandboxSettings(error_rate=0.3, seed=8))
    counts = Counter(first)
    assert first == again and first != other
    assert set(counts) == {200, 500, 502, 503}
    assert 0.2 <= (300 - counts[200]) / 300 <= 0.4


async def test_fail_first_n_then_recover(session: aiohttp.ClientSession) -> None:
    server = await serve(SandboxSettings(fail_first_n=3, retry_after=2))
    try:
        results = [await get(session, f"{server.url}/geo/x") for _ in range(5)]
        assert [status for status, _, _ in results] == [503, 503, 503, 200, 200]
        assert results[0][2]["Retry-After"] == "2" and "Retry-After" not in results[3][2]
        server.update(error_rate=1.0)
        assert (await get(session, f"{server.url}/geo/x"))[0] in (500, 502, 503)
        assert server.stats()["errors_5xx"] == 4
    finally:
        await server.close()


async def test_close_frees_the_port(session: aiohttp.ClientSession) -> None:
    server = await serve()
    assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
    await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(session, f"{server.url}/geo/x")


@pytest.mark.parametrize(
    "changes",
    [{"rate": 0}, {"burst": 0}, {"latency": -1}, {"latency": (2, 1)}, {"error_rate": 1.5}],
)
def test_bad_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SandboxSettings(**changes)


def test_default_burst_is_one_seconds_worth() -> None:
    assert SandboxSettings(rate=12.5).effective_burst == 13
    assert SandboxSettings(rate=0.5).effective_burst == 1
    assert SandboxSettings(rate=5, burst=2).effective_burst == 2


async def test_wait_for_calls_returns_once_that_many_arrived(
    session: aiohttp.ClientSession,
) -> None:
    server = await serve()
    try:
        waiting = asyncio.ensure_future(server.wait_for_calls(2))
        await get(session, f"{server.url}/geo/10.0.0.1")
        await asyncio.sleep(0)
        assert not waiting.done()  # one of two
        await get(session, f"{server.url}/geo/10.0.0.2")
        await asyncio.wait_for(waiting, 2)
        with pytest.raises(TimeoutError):
            await server.wait_for_calls(3, timeout=0.1)  # nobody calls
        waiting = asyncio.ensure_future(server.wait_for_calls(3))  # two calls so far ...
        await asyncio.sleep(0)
        server.reset()  # ... and none after a reset: three calls from here on
        for n in range(3, 5):
            await get(session, f"{server.url}/geo/10.0.0.{n}")
        await asyncio.sleep(0)
        assert not waiting.done()
        await get(session, f"{server.url}/geo/10.0.0.5")
        await asyncio.wait_for(waiting, 2)
    finally:
        await server.close()
