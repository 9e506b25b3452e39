"""Metrics, health, heartbeats and ``enricher status`` against a real worker; the counting proxies
against a real local HTTP server."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from enricher.caller import ApiCaller
from enricher.errors import CallError
from enricher.heartbeat import BEAT_TTL
from enricher.metrics import MeteredClient, MeteredLimiter, WorkerStats, metered_session
from enricher.runtime import http_session
from enricher.sandbox import SandboxServer
from enricher.services import find_free_port

from .fakes import FakeApi, FakeRetry
from .harness import Stack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- the proxies -------------------------------------------------------------------------------


Api = partial(FakeApi, concurrency=8, retry=FakeRetry(backoff_min=0.01, backoff_max=0.01))


class SlowLimiter:
    async def acquire(self, api: str, lane: Any = None, seat: Any = None) -> None:
        await asyncio.sleep(0.02)
        if seat is not None:
            await seat.acquire()

    async def block(self, api: str, seconds: float) -> None:
        pass


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, deque[int]]]:
    statuses: deque[int] = deque()

    async def handler(request: web.Request) -> web.Response:
        status = statuses.popleft() if statuses else 200
        return web.json_response({"ip": request.match_info["ip"]}, status=status)

    app = web.Application()
    app.router.add_get("/geo/{ip}", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", statuses
    finally:
        await runner.cleanup()


async def test_proxies_count_calls_attempts_and_waits(scripted: tuple[str, deque[int]]) -> None:
    url, statuses = scripted
    stats = WorkerStats(["geo"])
    session = http_session()

    async def no_sleep(_: float) -> None:
        pass

    try:
        caller = ApiCaller(
            apis={"geo": Api("geo", f"{url}/geo/{{ip}}")},
            limiter=MeteredLimiter(SlowLimiter(), stats),
            session=metered_session(session, stats),
            sleep=no_sleep,
        )
        client = MeteredClient(caller, stats)
        statuses.extend([429, 200, 500, 500, 500, 404])
        assert await client.call("geo", {"ip": "1.1.1.1"}) == {"ip": "1.1.1.1"}  # 429, then 200
        with pytest.raises(CallError):
            await client.call("geo", {"ip": "2.2.2.2"})  # three 500s
        with pytest.raises(CallError):
            await client.call("geo", {"ip": "3.3.3.3"})  # 404: not retried
        await client.call("geo", {"ip": "4.4.4.4"})
    finally:
        await session.close()
    geo = stats.api("geo")
    assert geo.calls == {"ok": 2, "http_status": 2}
    assert geo.attempts == {"429": 1, "2xx": 2, "5xx": 3, "4xx": 1}
    assert geo.grants == 7 and geo.waits.count == 7 and geo.waits.sum >= 7 * 0.015
    assert geo.in_flight == 0 and geo.waiting == 0 and geo.errors == 2


# --- a real worker -----------------------------------------------------------------------------


def page_view(i: int) -> dict[str, Any]:
    return {"type": "page_view", "user": f"u{i % 7}", "seq": i, "client": {"ip": f"10.9.0.{i}"}}


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def eventually(check: Any, timeout: float = 10.0) -> Any:
    """Poll ``await check()`` until it returns a truthy value (then returned)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.5)


@pytest.mark.integration
async def test_metrics_health_status_and_json_logs_match_what_happened(
    stack: Stack, sandbox: SandboxServer
) -> None:
    port = find_free_port()
    config = stack.write_config(stack.config(quotas=["100000/day"]))
    worker = stack.start_worker(config, ["--web-port", str(port), "--log-format", "json"])
    n = 40
    events: list[tuple[str | None, Any]] = [(f"u{i % 7}", page_view(i)) for i in range(n)]
    events.append(("u1", {"type": "click", "user": "u1"}))  # unmatched: passed through
    events += [("bad", b"{not json"), ("bad", b"[1, 2]"), ("u2", {"type": "page_view"})]
    await stack.produce(events)
    got = await stack.collect(expected=len(events))
    assert len(got.outputs) == n + 1 and len(got.dead_letters) == 3
    calls = sandbox.stats()["calls"]
    assert calls == n

    base = f"http://127.0.0.1:{port}"

    async def scraped() -> Samples | None:
        status, text = await http_get(f"{base}/metrics")
        assert status == 200
        samples = parse_metrics(text)
        lags = [v for (name, _), v in samples.items() if name == "enricher_partition_lag"]
        ready = value(samples, "enricher_quota_used", api="geo", period="day") == n
        return samples if ready and lags and not any(lags) else None

    samples = await eventually(scraped)
    assert samples, "quota gauges or lag never settled"
    assert value(samples, "enricher_events_total", lane="live", outcome="output") == n + 1
    assert value(samples, "enricher_events_total", lane="live", outcome="dead_letter") == 3
    assert value(samples, "enricher_dead_letters_total", lane="live", kind="invalid_event") == 3
    assert value(samples, "enricher_api_calls_total", api="geo", outcome="ok") == n
    assert value(samples, "enricher_api_calls_total", api="geo", outcome="timeout") == 0
    assert value(samples, "enricher_api_attempts_total", api="geo", result="2xx") == calls
    assert value(samples, "enricher_limiter_tokens_total", api="geo") == calls
    assert value(samples, "enricher_limiter_wait_seconds_count", api="geo") == calls
    assert value(samples, "enricher_quota_remaining", api="geo", period="day") == 100000 - n
    assert value(samples, "enricher_events_in_flight", lane="live") == 0
    assert value(samples, "enricher_api_calls_in_flight", api="geo") == 0
    assert value(samples, "enricher_cache_lookups_total", result="hit") == 0

    status, body = await http_get(f"{base}/health")
    health = json.loads(body)
    assert status == 200 and health["ok"] is True and health["stuck"] == []
    assert len(health["partitions"]) == 8  # the input topic's and the replay topic's

    async def fleet() -> dict[str, Any]:
        return dict(json.loads(await stack.enricher("status", "--config", str(config), "--json")))

    report = await fleet()
    assert report["workers"]["alive"] == 1
    assert report["workers"]["list"][0]["web_url"] == base
    inputs = [p for p in report["partitions"] if p["topic"] == stack.topics["input"]]
    assert {p["topic"] for p in report["partitions"]} == {
        stack.topics["input"],
        stack.topics["replay"],
    }
    assert len(inputs) == 4 and all(p["lag"] == 0 and p["worker"] for p in inputs)
    assert sum(p["committed"] or 0 for p in inputs) == len(events)
    assert report["lag"] == 0 and report["stuck"] == []
    geo = report["apis"]["geo"]
    assert geo["calls"] == {"ok": n} and geo["errors"] == 0
    assert geo["attempts_total"] == calls and geo["status_429"] == 0
    assert geo["limiter"]["waits"] == calls
    (day,) = geo["quotas"]
    assert (day["used"], day["remaining"], day["limit"]) == (n, 100000 - n, 100000)
    assert report["events"]["live"]["outputs"] == n + 1
    assert report["events"]["live"]["dead_letters_by_kind"] == {"invalid_event": 3}
    assert report["in_flight"] == {"events": {"live": 0, "replay": 0}, "calls": 0}
    assert report["replays"] == []
    human = await stack.enricher("status", "--config", str(config))
    assert "workers alive: 1" in human and "geo/day" in human

    stopped = time.monotonic()
    assert await asyncio.to_thread(worker.stop) == 0

    async def gone() -> bool:
        return (await fleet())["workers"]["alive"] == 0

    assert await eventually(gone, timeout=BEAT_TTL)
    assert time.monotonic() - stopped < 20 + BEAT_TTL

    lines = [line for line in worker.log_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(p) for p in parsed)
    ready = [p for p in parsed if p["logger"] == "enricher.app" and "ready" in p["message"]]
    assert ready and ready[0]["web_url"] == base
    assert any(p["logger"].startswith("faust") for p in parsed)
