"""The deadline and the retry budget in the real caller, against the sandbox API (real time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from enricher.caller import ApiCaller
from enricher.config import ApiSettings, config_from_dict
from enricher.errors import CallError
from enricher.sandbox import SandboxServer, SandboxSettings, run_sandbox
from enricher.services import find_free_port

from .harness import Stack


class OpenLimiter:
    """Grants every token at once: these tests are about retries, not rates."""

    async def acquire(self, api: str, lane: Any = None, seat: Any = None) -> None:
        if seat is not None:
            await seat.acquire()

    async def block(self, api: str, seconds: float) -> None:
        return None

    async def server_signal(
        self, api: str, remaining: int, reset: float, grant: Any = None
    ) -> None:
        return None


def geo(url: str, **settings: Any) -> dict[str, ApiSettings]:
    """The real config models for one API ``geo`` on the sandbox."""
    api = {"url": f"{url}/geo/{{ip}}", "rate": "1000/s", **settings}
    return dict(config_from_dict({"apis": {"geo": api}}).apis)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _sandbox(**settings: Any) -> SandboxServer:
    return await run_sandbox(SandboxSettings(**settings), host="127.0.0.1", port=0)


async def _fail(caller: ApiCaller, ip: str = "10.0.0.1") -> CallError:
    with pytest.raises(CallError) as caught:
        await caller.call("geo", {"ip": ip})
    return caught.value


async def test_the_deadline_bounds_attempts_against_an_api_that_stays_down(
    session: aiohttp.ClientSession,
) -> None:
    api = await _sandbox(failing=True, latency=0.3)
    try:
        retry = {"attempts": 20, "backoff": "50ms..50ms", "deadline": "1s"}
        caller = ApiCaller(apis=geo(api.url, retry=retry), limiter=OpenLimiter(), session=session)
        started = time.monotonic()
        error = await _fail(caller)
        took = time.monotonic() - started
        calls = api.stats()["calls"]
    finally:
        await api.close()
    # each attempt takes 0.3 s and each wait 0.05 s: about 3 fit in 1 s, never 20
    assert 2 <= error.attempts <= 3 and calls == error.attempts
    assert took < 2.5
    assert error.as_dict() == {
        "kind": "http_status",
        "message": "HTTP 503 from api 'geo'; no retry: deadline exceeded (1s)",
        "api": "geo",
        "status": 503,
        "attempts": error.attempts,
    }


async def test_timeouts_keep_their_kind_when_the_deadline_stops_them(
    session: aiohttp.ClientSession,
) -> None:
    api = await _sandbox(latency=1.0)
    try:
        retry = {"attempts": 20, "backoff": "10ms..10ms", "deadline": "700ms"}
        settings = geo(api.url, timeout="300ms", retry=retry)
        caller = ApiCaller(apis=settings, limiter=OpenLimiter(), session=session)
        error = await _fail(caller)
    finally:
        await api.close()
    assert error.kind == "timeout" and error.attempts in (2, 3)
    assert error.message == "timed out after 0.3s; no retry: deadline exceeded (0.7s)"


async def test_the_budget_bounds_retries_of_many_events_and_says_so(
    session: aiohttp.ClientSession,
) -> None:
    api = await _sandbox(error_rate=1.0, seed=3)
    events = 60
    try:
        retry = {"attempts": 5, "backoff": "1ms..1ms", "budget": 0.2}
        caller = ApiCaller(apis=geo(api.url, retry=retry), limiter=OpenLimiter(), session=session)
        errors = await asyncio.gather(*(_fail(caller, f"10.0.0.{i}") for i in range(events)))
        calls = api.stats()["calls"]
    finally:
        await api.close()
    # without a budget: 60 x 5 = 300 calls; with it, 60 + 0.2 x 60 + the floor (3/s x 10 s)
    assert calls == sum(e.attempts for e in errors) <= events + 12 + 30
    stopped = [e for e in errors if e.retry_stopped == "budget"]
    assert stopped and all(
        e.message.endswith("; no retry: retry budget exhausted") for e in stopped
    )
    assert {e.kind for e in errors} == {"http_status"}


async def test_a_few_failures_still_recover_within_the_limits(
    session: aiohttp.ClientSession,
) -> None:
    api = await _sandbox(fail_first_n=2)
    try:
        retry = {"attempts": 5, "backoff": "10ms..10ms"}  # default deadline and budget
        caller = ApiCaller(apis=geo(api.url, retry=retry), limiter=OpenLimiter(), session=session)
        answer = await caller.call("geo", {"ip": "10.0.0.1"})
        calls = api.stats()["calls"]
    finally:
        await api.close()
    assert answer["ip"] == "10.0.0.1" and calls == 3


# --- a real worker -------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_worker_dead_letters_what_the_deadline_and_budget_stop(
    tmp_path: Any, kafka: Any, redis_service: Any
) -> None:
    n = 20
    api = await _sandbox(failing=True, latency=0.2)
    stack = Stack(tmp_path, kafka_url=kafka.url, redis_url=redis_service.url, api_url=api.url)
    port = find_free_port()
    try:
        await stack.create_topics()
        retry = {"attempts": 20, "backoff": "50ms..50ms", "deadline": "1s"}
        config = stack.config(retry=retry, circuit={"failures": 0})  # no circuit: no holding
        stack.start_worker(stack.write_config(config), ["--web-port", str(port)])
        events = [(f"u{i}", page_view(i)) for i in range(n)]
        await stack.produce(events)
        got = await stack.collect(expected=n, timeout=60)
        calls = api.stats()["calls"]
        metrics = await _metrics(f"http://127.0.0.1:{port}/metrics")
    finally:
        stack.stop_all()
        await api.close()
    assert not got.outputs and len(got.dead_letters) == n and got.duplicates() == 0
    errors = [letter["error"] for letter in got.dead_letters]
    assert {(e["kind"], e["status"], e["api"]) for e in errors} == {("http_status", 503, "geo")}
    reasons = {e["message"].partition("; no retry: ")[2] for e in errors}
    assert reasons <= {"deadline exceeded (1s)", "retry budget exhausted"} and reasons
    assert all(1 <= e["attempts"] <= 4 for e in errors)
    assert calls == sum(e["attempts"] for e in errors)  # every attempt counted, none hidden
    assert set(metrics) == {"budget", "deadline"} and sum(metrics.values()) == n


def page_view(i: int) -> dict[str, Any]:
    return {"type": "page_view", "user": f"u{i}", "seq": i, "client": {"ip": f"10.7.0.{i}"}}


async def _metrics(url: str) -> dict[str, float]:
    """``enricher_retries_denied_total`` samples of api geo by their reason label."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "enricher_retries_denied_total" and sample.labels["api"] == "geo":
                found[sample.labels["reason"]] = sample.value
    return found
