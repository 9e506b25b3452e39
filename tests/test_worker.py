"""Real worker processes against the embedded broker, Redis and sandbox API.

Each test accounts for every input offset (exactly one output or dead letter; duplicates only
where a crash allows them) and checks what the API itself saw.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from collections import defaultdict
from typing import Any

import pytest
from aiohttp import web

from enricher.sandbox import SandboxServer, SandboxSettings, geo_answer, run_sandbox
from enricher.services import EmbeddedRedis
from enricher.worker import GC_YOUNG_THRESHOLD, tune_gc

from .harness import Stack

pytestmark = pytest.mark.integration


def page_view(i: int, *, user: str, ip: str | None = None) -> dict[str, Any]:
    return {
        "type": "page_view",
        "user": user,
        "seq": i,
        "client": {"ip": ip or f"10.1.{i % 250}.{i // 250}"},
    }


def busiest_second(stats: dict[str, Any]) -> int:
    return int(stats["max_calls_in_any_second"])


async def test_every_event_ends_exactly_once_with_values_and_key_order(
    stack: Stack, sandbox: SandboxServer
) -> None:
    stack.start_worker(stack.write_config(stack.config()))
    events: list[tuple[str | None, Any]] = []
    for i in range(240):
        events.append((f"user{i % 12}", page_view(i, user=f"user{i % 12}")))
    events.append(("user0", {"type": "click", "user": "user0", "seq": 1000}))  # unmatched
    events.append(("bad", b"{not json"))
    events.append(("bad", b"[1, 2, 3]"))
    events.append(("user1", {"type": "page_view", "user": "user1", "seq": 1001}))  # no ip
    await stack.produce(events)

    got = await stack.collect(expected=len(events))

    assert got.total == len(events) and got.duplicates() == 0
    assert len(got.outputs) == 241 and len(got.dead_letters) == 3
    assert sorted(d["error"]["kind"] for d in got.dead_letters) == ["invalid_event"] * 3
    # values: the sandbox's deterministic answer for each IP, under the rule's `into`
    for out in got.outputs:
        if out["type"] == "click":
            assert out["enrichment"] == {}
            continue
        expected = json.loads(json.dumps(geo_answer(out["client"]["ip"])))
        assert out["enrichment"] == {"geo": expected}
    # per-key order: outputs of one user come in input order
    seqs: dict[str, list[int]] = defaultdict(list)
    for out in got.outputs:
        seqs[out["user"]].append(out["seq"])
    for user, order in seqs.items():
        assert order == sorted(order), f"{user} out of order: {order}"
    # each record keeps its input's key and names its source
    assert all(key is not None for key in got.keys.values())
    stats = sandbox.stats()
    assert stats["calls"] == 240  # one call per enriched page view, no more


async def test_one_worker_stays_within_rate_and_uses_it(
    stack: Stack, sandbox: SandboxServer
) -> None:
    rate, burst, n = 20, 5, 120
    stack.start_worker(stack.write_config(stack.config(rate=f"{rate}/s", burst=burst)))
    await stack.produce([(f"u{i}", page_view(i, user=f"u{i}")) for i in range(n)])
    got = await stack.collect(expected=n)
    assert len(got.outputs) == n and got.duplicates() == 0
    stats = sandbox.stats()
    assert stats["calls"] == n
    assert busiest_second(stats) <= rate + burst
    assert full_second_utilisation(stats, rate) >= 0.9


def full_second_utilisation(stats: dict[str, Any], rate: float) -> float:
    """Mean calls in the seconds strictly between the first and the last, over the rate."""
    per_second = {int(k): v for k, v in stats["calls_per_second"].items()}
    seconds = sorted(per_second)
    inner = seconds[1:-1]
    assert len(inner) >= 3, per_second
    return sum(per_second[s] for s in inner) / (len(inner) * rate)


async def test_three_workers_share_one_limit(stack: Stack, sandbox: SandboxServer) -> None:
    rate, burst, n = 30, 5, 300
    config = stack.write_config(stack.config(rate=f"{rate}/s", burst=burst))
    for _ in range(3):
        stack.start_worker(config)
    await stack.wait_for_members(3)
    await stack.produce([(f"u{i}", page_view(i, user=f"u{i}")) for i in range(n)])
    got = await stack.collect(expected=n, timeout=90)
    stats = sandbox.stats()
    # a rebalance while workers join may re-deliver in-flight events: at-least-once, never less
    assert set(got.sources) == {f"{stack.topics['input']}/{p}/{o}" for p, o in stack.sent}
    assert stats["calls"] >= n
    assert busiest_second(stats) <= rate + burst
    assert full_second_utilisation(stats, rate) >= 0.9


async def test_quota_lets_exactly_n_through_and_holds_the_rest_until_raised(
    stack: Stack, sandbox: SandboxServer
) -> None:
    # One key: events run one after another, so the held ones are exactly the last ones.
    n, quota = 30, 20
    data = stack.config(quotas=[f"{quota}/day"])
    worker = stack.start_worker(stack.write_config(data))
    await stack.produce([("one-user", page_view(i, user="one-user")) for i in range(n)])
    got = await stack.collect_at_least(quota)
    assert len(got.outputs) == quota and not got.dead_letters
    assert sandbox.stats()["calls"] == quota
    await stack.wait_committed({stack.sent[0][0]: quota})  # the held events stay uncommitted
    assert await asyncio.to_thread(worker.stop) == 0  # a held worker still stops cleanly

    data["apis"]["geo"]["quotas"] = [f"{n + 5}/day"]
    stack.start_worker(stack.write_config(data))
    got = await stack.collect(expected=n)
    assert len(got.outputs) == n and got.duplicates() == 0 and not got.dead_letters
    assert sandbox.stats()["calls"] == n
    assert [o["seq"] for o in got.outputs] == list(range(n))


async def test_429_with_retry_after_and_5xx_bursts_lose_nothing(
    tmp_path: Any, kafka: Any, redis_service: Any
) -> None:
    n = 60
    settings = SandboxSettings(rate=15.0, burst=3, error_rate=0.2, seed=7)
    api = await run_sandbox(settings, host="127.0.0.1", port=0)
    stack = Stack(tmp_path, kafka_url=kafka.url, redis_url=redis_service.url, api_url=api.url)
    try:
        await stack.create_topics()
        retry = {"attempts": 12, "backoff": "50ms..1s"}
        stack.start_worker(stack.write_config(stack.config(rate="20/s", burst=5, retry=retry)))
        await stack.produce([(f"u{i}", page_view(i, user=f"u{i}")) for i in range(n)])
        got = await stack.collect(expected=n, timeout=90)
        stats = api.stats()
    finally:
        stack.stop_all()
        await api.close()
    assert stats["rejected_429"] > 0 and stats["errors_5xx"] > 0  # the faults really happened
    assert len(got.outputs) == n and not got.dead_letters and got.duplicates() == 0


async def test_sigkill_loses_nothing(stack: Stack, sandbox: SandboxServer) -> None:
    n, in_flight = 200, 32
    data = stack.config(rate="60/s", burst=10)
    data["worker"]["in_flight"] = in_flight
    config = stack.write_config(data)
    first = stack.start_worker(config)
    await stack.produce([(f"u{i % 40}", page_view(i, user=f"u{i % 40}")) for i in range(n)])
    await stack.collect_at_least(60)
    first.kill()
    stack.start_worker(config)
    got = await stack.collect(expected=n, timeout=90)
    assert set(got.sources) == {f"{stack.topics['input']}/{p}/{o}" for p, o in stack.sent}
    assert not got.dead_letters
    # only what was in flight when it died, or finished since the last commit (0.5 s or
    # `in_flight` acks, whichever comes first)
    assert got.duplicates() <= 2 * in_flight
    assert_key_order(got.outputs)


def assert_key_order(outputs: list[dict[str, Any]]) -> None:
    """Per user, the first time each seq appears, seqs ascend (replays after a crash may repeat
    a suffix, never reorder)."""
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[int] = set()
    for out in outputs:
        if out["seq"] not in seen:
            seen.add(out["seq"])
            firsts[out["user"]].append(out["seq"])
    for user, order in firsts.items():
        assert order == sorted(order), f"{user} out of order: {order}"


async def test_redis_outage_pauses_calls_then_resumes_by_itself(
    tmp_path: Any, kafka: Any, sandbox: SandboxServer
) -> None:
    n, rate = 160, 20
    with EmbeddedRedis() as redis:
        stack = Stack(tmp_path, kafka_url=kafka.url, redis_url=redis.url, api_url=sandbox.url)
        try:
            await stack.create_topics()
            stack.start_worker(stack.write_config(stack.config(rate=f"{rate}/s", burst=5)))
            await stack.produce([(f"u{i}", page_view(i, user=f"u{i}")) for i in range(n)])
            await stack.collect_at_least(30)
            redis.stop()
            down_from = time.time()
            await asyncio.sleep(4.0)  # the outage itself
            down_until = time.time()
            redis.start()  # back, and empty: every limiter key is gone
            got = await stack.collect(expected=n, timeout=90)
        finally:
            stack.stop_all()
    assert len(got.outputs) == n and not got.dead_letters and got.duplicates() == 0
    per_second = {int(k): v for k, v in sandbox.stats()["calls_per_second"].items()}
    # Calls granted just before the outage may land up to max_wait (1 s) later; after that,
    # no call is made without a token.
    silent = range(int(down_from) + 2, int(down_until))
    assert silent and all(per_second.get(s, 0) == 0 for s in silent), per_second
    assert sandbox.stats()["calls"] == n
    assert busiest_second(sandbox.stats()) <= rate + 5


async def test_slow_offset_zero_is_never_committed_past(
    tmp_path: Any, kafka: Any, redis_service: Any
) -> None:
    # PITFALLS 2: with offset 0 in flight, 1..9 (enriched) must not let the commit pass 0; they
    # are not even written, so a crash then duplicates nothing.
    gate = asyncio.Event()
    api = await run_gated_api(gate)
    stack = Stack(tmp_path, kafka_url=kafka.url, redis_url=redis_service.url, api_url=api.url)
    try:
        await stack.create_topics()
        config = stack.write_config(stack.config())
        first = stack.start_worker(config)
        events = [("k0", page_view(0, user="k0", ip="slow"))]
        events += [(f"k{i}", page_view(i, user=f"k{i}")) for i in range(1, 10)]
        await stack.produce(events, partition=0)
        await asyncio.wait_for(api.wait_calls(10), 60)  # every event enriched or being enriched
        await asyncio.sleep(2.5)  # two commit intervals: time for a wrong commit to happen
        assert await stack.committed() == {}  # nothing committed while offset 0 is in flight
        first.kill()
        gate.set()
        stack.start_worker(config)
        got = await stack.collect(expected=10)
    finally:
        stack.stop_all()
        await api.close()
    assert len(set(got.sources)) == 10 and got.duplicates() == 0
    assert any(o["client"]["ip"] == "slow" for o in got.outputs)


class GatedApi:
    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self.runner = runner
        self.url = url
        self.calls = 0
        self._called = asyncio.Event()

    def count(self) -> None:
        self.calls += 1
        self._called.set()

    async def wait_calls(self, n: int) -> None:
        """Until the API has been called ``n`` times (it runs on the test's own loop)."""
        while self.calls < n:
            self._called.clear()
            await self._called.wait()

    async def close(self) -> None:
        await self.runner.cleanup()


async def run_gated_api(gate: asyncio.Event) -> GatedApi:
    """An API that answers at once, except for ip ``slow``, which waits for ``gate``."""

    async def geo(request: web.Request) -> web.Response:
        api.count()
        if request.match_info["ip"] == "slow":
            await gate.wait()
        return web.json_response({"ip": request.match_info["ip"]})

    app = web.Application()
    app.router.add_get("/geo/{ip}", geo)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    api = GatedApi(runner, f"http://127.0.0.1:{port}")
    return api


async def test_sigterm_finishes_in_flight_events_and_restart_duplicates_nothing(
    stack: Stack, sandbox: SandboxServer
) -> None:
    n, rate = 150, 30
    data = stack.config(rate=f"{rate}/s", burst=5)
    data["worker"]["in_flight"] = 16
    config = stack.write_config(data)
    first = stack.start_worker(config)
    await stack.produce([(f"u{i % 30}", page_view(i, user=f"u{i % 30}")) for i in range(n)])
    await stack.collect_at_least(40)
    started = time.monotonic()
    # stop in a thread: the sandbox API runs on this test's event loop and must keep answering
    assert await asyncio.to_thread(first.stop, 10) == 0
    assert time.monotonic() - started < 10
    stack.start_worker(config)
    got = await stack.collect(expected=n)
    assert set(got.sources) == {f"{stack.topics['input']}/{p}/{o}" for p, o in stack.sent}
    assert got.duplicates() == 0 and not got.dead_letters
    assert sandbox.stats()["calls"] == n  # no call made twice either


async def test_quota_raised_live_with_limits_set_releases_held_events(
    stack: Stack, sandbox: SandboxServer
) -> None:
    n, quota = 20, 10
    config = stack.write_config(stack.config(quotas=[f"{quota}/day"]))
    stack.start_worker(config)
    await stack.produce([("one-user", page_view(i, user="one-user")) for i in range(n)])
    got = await stack.collect_at_least(quota)
    assert len(got.outputs) == quota and sandbox.stats()["calls"] == quota
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "enricher",
        "limits",
        "set",
        "--config",
        str(config),
        "geo",
        "--quota",
        f"{n}/day",
    )
    assert await proc.wait() == 0
    raised = time.monotonic()
    first_after = await stack.collect_at_least(quota + 1)
    # the contract's 2 s, plus the 1 s collect_at_least reads on to see nothing more is coming
    assert time.monotonic() - raised < 2.0 + 1.0
    got = await stack.collect(expected=n)
    assert len(got.outputs) == n and got.duplicates() == 0 and len(first_after.outputs) > quota
    assert sandbox.stats()["calls"] == n


async def test_sigterm_of_one_of_two_workers_under_backlog_duplicates_nothing(
    stack: Stack, sandbox: SandboxServer
) -> None:
    # The stopping worker commits what it wrote before it leaves; the survivor, whose
    # partitions are all revoked and re-assigned, commits before the revocation completes and
    # never writes an event it will read again.
    n, rate = 300, 25  # a backlog that lasts through the stop and the rebalance after it
    data = stack.config(rate=f"{rate}/s", burst=5)
    data["worker"]["in_flight"] = 48  # each worker has many events waiting for tokens
    config = stack.write_config(data)
    first = stack.start_worker(config)
    stack.start_worker(config)
    await stack.wait_for_members(2)
    await stack.produce([(f"u{i % 30}", page_view(i, user=f"u{i % 30}")) for i in range(n)])
    await stack.collect_at_least(40)
    # stop in a thread: the sandbox API runs on this test's event loop and must keep answering
    assert await asyncio.to_thread(first.stop, 15) == 0
    got = await stack.collect(expected=n)
    assert set(got.sources) == {f"{stack.topics['input']}/{p}/{o}" for p, o in stack.sent}
    assert got.duplicates() == 0 and not got.dead_letters
    assert_key_order(got.outputs)


def test_tune_gc_freezes_what_exists_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
