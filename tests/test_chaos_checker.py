"""The chaos suite's checker and the sandbox's fault routes (no broker needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from chaos.checker import Seen, account, calls_over_limit, max_in_window, recovery_time
from chaos.faults import unsafe_calls
from enricher.sandbox import SandboxServer, SandboxSettings, run_sandbox


def test_account_counts_lost_duplicated_and_dead_letters_by_kind() -> None:
    seen = {
        "in/0/0": Seen(["output"]),
        "in/0/1": Seen(["output", "output"]),
        "in/0/2": Seen(["timeout"]),
        "in/1/0": Seen(["invalid_event", "invalid_event", "invalid_event"]),
        "other/0/0": Seen(["output"]),
    }
    acc = account(["in/0/0", "in/0/1", "in/0/2", "in/1/0", "in/1/1"], seen)
    assert (acc.produced, acc.outputs, acc.lost, acc.duplicated, acc.unexpected) == (5, 2, 1, 3, 1)
    assert dict(acc.dead_letters) == {"timeout": 1, "invalid_event": 1}
    assert acc.dead_lettered == 2


def test_gcra_check_allows_rate_plus_burst_and_counts_the_excess() -> None:
    paced = [i / 10 for i in range(100)]  # 10/s for 10 s
    assert calls_over_limit(paced, rate=10, burst=1) == 0
    burst = [0.0] * 5 + [1 + i / 10 for i in range(10)]
    assert calls_over_limit(burst, rate=10, burst=5) == 0
    assert calls_over_limit([0.0] * 8, rate=10, burst=5, jitter=0) == 3
    assert calls_over_limit([i / 20 for i in range(40)], rate=10, burst=2, jitter=0) == 19


def test_max_in_window_and_recovery_time() -> None:
    times = [0.0, 0.5, 0.99, 1.0, 5.0]
    assert max_in_window(times) == 3
    back = [10.0 + 2.0] + [13 + i / 50 for i in range(50)]  # full rate from t=13
    assert recovery_time(back, since=10.0, rate=50) == pytest.approx(13 + 39 / 50 - 10)
    assert recovery_time([11.0], since=10.0, rate=50) == float("inf")


def test_unsafe_calls_flags_anything_but_encoded_segments_on_the_host() -> None:
    host = "127.0.0.1:8081"
    ok = {"path": "/geo/a%2F..%3Fb?lang=en%20x", "host": host}
    assert unsafe_calls([ok], host) == []
    bad = [
        "/geo/../admin?lang=en",
        "/geo/a/b?lang=en",
        "/geo/..?lang=en",
        "/geo/x?lang=a&b=c",
        "/admin?lang=en",
        "/geo/x?lang=a#f",
    ]
    calls = [{"path": p, "host": host} for p in bad] + [{"path": "/geo/x?lang=en", "host": "evil"}]
    assert len(unsafe_calls(calls, host)) == len(calls)


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    server = await run_sandbox(SandboxSettings(hang=0.3, drip_interval=0.05))
    try:
        yield server
    finally:
        await server.close()


async def test_fault_routes_misbehave_as_named(sandbox: SandboxServer) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{sandbox.url}/fault"
        async with http.get(f"{url}/5xx/x") as r:
            assert r.status == 503
        async with http.get(f"{url}/429/x") as r:
            assert r.status == 429 and "Retry-After" not in r.headers
        async with http.get(f"{url}/429-absurd/x") as r:
            assert r.headers["Retry-After"] == "999999999"
        async with http.get(f"{url}/nonjson/x") as r:
            assert r.content_type == "text/html"
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"{url}/reset/x") as r:
                await r.read()
        with pytest.raises(asyncio.TimeoutError):
            async with http.get(f"{url}/timeout/x", timeout=aiohttp.ClientTimeout(total=0.1)):
                pass
        async with http.get(f"{url}/huge/x") as r:
            first = await r.content.read(1024 * 1024)  # streamed: read a little, then hang up
            assert first.startswith(b'{"data": "x')
        async with http.get(f"{url}/drip/x") as r:
            assert (await r.json())["drip"] == "x" * 100
    calls = sandbox.calls()
    assert [c["path"] for c in calls][:2] == ["/fault/5xx/x", "/fault/429/x"]
    assert all(c["host"] == f"127.0.0.1:{sandbox.port}" and c["time"] > 0 for c in calls)


async def test_call_log_keeps_the_raw_path(sandbox: SandboxServer) -> None:
    async with aiohttp.ClientSession() as http:
        raw = f"{sandbox.url}/geo/a%2F..%3Fb?lang=%0D%0A"
        async with http.get(aiohttp.client.URL(raw, encoded=True)) as r:
            assert r.status == 200
    assert sandbox.calls()[-1]["path"] == "/geo/a%2F..%3Fb?lang=%0D%0A"
