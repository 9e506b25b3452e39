"""Live operations against real workers and the in-process sandbox: limits changed while running,
shadow limits, the API's own rate-limit headers and the circuit breaker (issue 5).

Every test checks what the sandbox API itself counted, and accounts for every input offset.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from enricher.sandbox import SandboxServer
from enricher.services import find_free_port

from .harness import Stack

pytestmark = pytest.mark.integration


def page_view(i: int) -> dict[str, Any]:
    return {"type": "page_view", "user": f"u{i % 16}", "seq": i, "client": {"ip": f"10.7.0.{i}"}}


def backlog(n: int) -> list[tuple[str | None, Any]]:
    # distinct IPs (no cache, no shared calls); 16 keys spread over every partition
    return [
        (f"u{i % 16}", {**page_view(i), "client": {"ip": f"10.7.{i // 250}.{i % 250}"}})
        for i in range(n)
    ]


async def until(
    check: Callable[[], Awaitable[bool] | bool], *, timeout: float, every: float = 0.05
) -> None:
    """Wait until ``check()`` is true (fails the test after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not reached within {timeout}s"
        await asyncio.sleep(every)


async def limits_json(stack: Stack, config: Path) -> dict[str, Any]:
    out = await stack.enricher("limits", "show", "--config", str(config), "--json")
    (geo,) = json.loads(out)["apis"]
    return dict(geo)


async def status_json(stack: Stack, config: Path) -> dict[str, Any]:
    return dict(json.loads(await stack.enricher("status", "--config", str(config), "--json")))


async def scrape(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


def circuit_gauge(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith('enricher_circuit_open{api="geo"}'):
            return float(line.split()[-1])
    return None


async def test_limit_lowered_while_three_workers_run_is_obeyed_within_two_seconds(
    stack: Stack, sandbox: SandboxServer
) -> None:
    burst = 10
    config = stack.write_config(stack.config(rate="40/s", burst=burst))
    for _ in range(3):
        stack.start_worker(config)
    await stack.wait_for_members(3)
    n = 300
    await stack.produce(backlog(n))
    await until(lambda: sandbox.stats()["calls"] >= 60, timeout=30)
    assert sandbox.stats()["max_calls_in_any_second"] > 10 + burst  # 40/s before the change

    await stack.enricher("limits", "set", "--config", str(config), "geo", "--rate", "10/s")
    applied = time.time()
    first = math.ceil(applied + 2)  # the first full second starting 2 s after the set
    seconds = range(first, first + 4)
    await asyncio.sleep(max(0.0, seconds[-1] + 1 - time.time()) + 0.05)
    per_second = sandbox.stats()["calls_per_second"]
    counts = [per_second.get(str(s), 0) for s in seconds]
    assert all(c <= 10 + burst for c in counts), counts
    assert sum(counts) >= 30, counts  # the backlog was still being worked: about 10/s
    assert sandbox.stats()["calls"] < n  # and not finished

    await stack.enricher("limits", "reset", "--config", str(config), "geo")
    got = await stack.collect(expected=n, timeout=60)
    assert len(got.outputs) == n and not got.dead_letters and got.duplicates() == 0
    stats = sandbox.stats()
    assert stats["calls"] == stats["ok"] == n and stats["rejected_429"] == 0


async def test_shadow_limit_enforces_nothing_and_counts_the_calls_it_would_delay(
    stack: Stack, sandbox: SandboxServer
) -> None:
    rate, burst, shadow_rate, shadow_burst = 50, 10, 5, 5
    config = stack.write_config(stack.config(rate=f"{rate}/s", burst=burst))
    await stack.enricher(
        "limits", "set", "--config", str(config), "geo", "--shadow-rate", f"{shadow_rate}/s"
    )
    stack.start_worker(config)
    n = 300
    await stack.produce(backlog(n))
    await until(lambda: sandbox.stats()["calls"] > 0, timeout=60, every=0.01)
    started = time.monotonic()
    await until(lambda: sandbox.stats()["calls"] >= n, timeout=30, every=0.01)
    span = time.monotonic() - started
    expected = (n - burst) / rate  # 5.8 s at 50/s; 59 s if the shadow 5/s were enforced
    assert expected * 0.8 <= span <= expected * 1.25 + 0.5, span
    stats = sandbox.stats()
    assert stats["max_calls_in_any_second"] <= rate + burst
    assert stats["max_calls_in_any_second"] >= rate * 0.8  # the same rate as without a shadow

    got = await stack.collect(expected=n)
    assert len(got.outputs) == n and not got.dead_letters and got.duplicates() == 0
    geo = await limits_json(stack, config)
    shadow = geo["shadow"]
    assert shadow["rate_per_second"] == shadow_rate and shadow["burst"] == shadow_burst
    assert geo["rate_per_second"] == rate  # nothing else changed
    assert shadow["calls"] == n
    assert 0 < shadow["delayed"] <= shadow["calls"]
    # what 5/s with a burst of 5 could have passed over the span of the calls
    passed = shadow_burst + shadow_rate * span
    assert abs(shadow["delayed"] - (n - passed)) <= shadow_rate * 1.0 + 2, (shadow, span)


async def test_server_lowering_its_remaining_slows_the_fleet_before_any_429(
    stack: Stack, sandbox: SandboxServer
) -> None:
    # 40 calls per 2 s window = 20/s, while our own bucket would allow 100/s
    sandbox.update(window_limit=40, window=2.0, ratelimit_headers="x")
    config = stack.write_config(stack.config(rate="100/s", burst=5))
    stack.start_worker(config)
    stack.start_worker(config)
    await stack.wait_for_members(2)
    n = 120
    started = time.monotonic()
    await stack.produce(backlog(n))
    got = await stack.collect(expected=n, timeout=60)
    elapsed = time.monotonic() - started

    assert len(got.outputs) == n and not got.dead_letters and got.duplicates() == 0
    stats = sandbox.stats()
    assert stats["rejected_429"] == 0, stats
    assert stats["calls"] == stats["ok"] == n
    assert elapsed >= (n - 40) / 20 - 1  # at the server's 20/s, not our 100/s
    assert stats["max_admitted_in_any_second"] <= 40


async def test_failing_api_opens_the_circuit_holds_events_and_they_flow_once_it_recovers(
    stack: Stack, sandbox: SandboxServer
) -> None:
    sandbox.update(failing=True)
    port = find_free_port()
    config = stack.write_config(
        stack.config(
            circuit={"failures": 3, "cool_down": "2s"},
            retry={"attempts": 3, "backoff": "20ms..100ms"},
        )
    )
    stack.start_worker(config, ["--web-port", str(port)])
    n = 20
    await stack.produce(backlog(n))

    async def circuit_open() -> bool:
        return (await status_json(stack, config))["open_circuits"] == ["geo"]

    await until(circuit_open, timeout=60, every=0.2)
    report = await status_json(stack, config)
    geo = report["apis"]["geo"]
    assert geo["circuit"]["state"] in ("open", "half-open")
    assert geo["circuit"]["failures"] >= 3
    assert "open circuits: geo" in await stack.enricher("status", "--config", str(config))

    async def gauge_is(value: float) -> bool:
        return circuit_gauge(await scrape(port)) == value

    await until(lambda: gauge_is(1.0), timeout=15, every=0.25)
    held_from, failed_before = time.monotonic(), sandbox.stats()["errors_5xx"]
    await asyncio.sleep(2.5)  # held: one probe per cool-down at most, no dead letters
    report = await status_json(stack, config)
    held = time.monotonic() - held_from
    probes = sandbox.stats()["errors_5xx"] - failed_before
    assert probes <= held / 2 + 2, (probes, held)
    live = report["events"]["live"]
    assert live["dead_letters"] == 0 and live["outputs"] == 0
    assert report["apis"]["geo"]["calls_total"] == 0  # no call finished: all held

    sandbox.update(failing=False)
    got = await stack.collect(expected=n, timeout=60)
    assert len(got.outputs) == n and not got.dead_letters and got.duplicates() == 0
    assert sorted(got.sources.values()) == [1] * n
    stats = sandbox.stats()
    assert stats["ok"] == n and stats["errors_5xx"] >= 3

    async def closed() -> bool:
        return (await status_json(stack, config))["apis"]["geo"]["circuit"]["state"] == "closed"

    await until(closed, timeout=30, every=0.2)
    report = await status_json(stack, config)
    assert report["open_circuits"] == [] and report["half_open_circuits"] == []
    assert report["events"]["live"]["dead_letters"] == 0
    await until(lambda: gauge_is(0.0), timeout=15, every=0.25)
    text = await scrape(port)
    attempts_5xx = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("enricher_api_attempts_total") and 'result="5xx"' in line
    ]
    assert attempts_5xx == [stats["errors_5xx"]]
