"""Replays through real workers: the replay lane, the shared cache, cancel (issue: replays)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from enricher.sandbox import SandboxServer, SandboxSettings, run_sandbox

from .harness import Stack
from .test_worker import page_view

pytestmark = pytest.mark.integration


async def status_of(stack: Stack, config: Any, replay_id: str) -> dict[str, Any]:
    out = await stack.enricher("replay", "status", replay_id, "--config", str(config), "--json")
    result: dict[str, Any] = json.loads(out)
    return result


def last_line(stdout: str) -> str:
    """The id a ``--detach`` command prints last."""
    return stdout.strip().splitlines()[-1].strip()


async def start_replay(stack: Stack, config: Any, *, share: float | None = None) -> str:
    """``enricher replay --from -1h --yes --detach``: re-feed the last hour; the replay id."""
    args = ["replay", "--config", str(config), "--from", "-1h", "--yes", "--detach"]
    if share is not None:
        args += ["--share", str(share)]
    return last_line(await stack.enricher(*args))


async def test_replay_with_a_warm_cache_calls_the_api_zero_times(
    stack: Stack, sandbox: SandboxServer
) -> None:
    n = 40
    config = stack.write_config(stack.config(cache_ttl="1h"))
    stack.start_worker(config)
    await stack.produce([(f"u{i}", page_view(i, user=f"u{i}")) for i in range(n)])
    live = await stack.collect(expected=n)
    assert len(live.outputs) == n and sandbox.stats()["calls"] == n

    replay_id = await start_replay(stack, config)
    got = await stack.collect_replayed(replay_id, n)
    assert got.replayed[replay_id] == n
    # same source (the original input) and same enrichment as the live outputs
    assert {s for s, _ in got.replay_outputs} == set(live.sources)
    live_enrichment = {o["seq"]: o["enrichment"] for o in live.outputs}
    assert {b["seq"]: b["enrichment"] for _, b in got.replay_outputs} == live_enrichment
    assert sandbox.stats()["calls"] == n  # every answer came from the shared cache
    status = await status_of(stack, config, replay_id)
    assert status["outputs"] == n and status["state"] == "done"


async def test_cold_replay_keeps_to_its_share_while_live_events_flow(
    stack: Stack, sandbox: SandboxServer
) -> None:
    rate, share, n = 20, 0.3, 45
    config = stack.write_config(stack.config(rate=f"{rate}/s", burst=3))
    stack.start_worker(config)
    await stack.produce([(f"r{i}", page_view(i, user=f"r{i}", ip=f"10.7.0.{i}")) for i in range(n)])
    await stack.collect(expected=n, timeout=60)

    replay_id = await start_replay(stack, config, share=share)
    live = [(f"l{i}", page_view(1000 + i, user=f"l{i}", ip=f"10.8.0.{i}")) for i in range(40)]
    await stack.produce(live)
    got = await stack.collect_replayed(replay_id, n, timeout=60)
    everything = await stack.collect(expected=n + len(live), timeout=60)
    live_times = sorted(everything.times)[n:]  # outputs of the live events sent during the replay
    assert len(live_times) == len(live)

    # The replay never beyond its share of the rate (its outputs' broker timestamps).
    replay_span = (max(got.replay_times) - min(got.replay_times)) / 1000
    replay_burst = max(1, int(3 * share))
    assert (n - replay_burst) / replay_span <= rate * share * 1.1
    # Live traffic keeps the rest of the rate: its calls as the API saw them (its outputs can
    # come in bursts: one waiting for a token holds back those behind it in its partition).
    live_calls = sorted(c["time"] for c in sandbox.calls() if "/10.8.0." in c["path"])
    assert len(live_calls) == len(live)
    live_span = live_calls[-1] - live_calls[0]
    assert (len(live_calls) - 1) / live_span >= 0.7 * rate * (1 - share), live_calls
    assert live_times[-1] < max(got.replay_times)  # live did not wait for the replay
    stats = sandbox.stats()
    assert stats["calls"] == 2 * n + len(live)
    assert stats["max_calls_in_any_second"] <= rate + 3


async def test_live_events_do_not_wait_behind_a_replay_backlog(
    stack: Stack, sandbox: SandboxServer
) -> None:
    # in_flight 8: the replay lane holds 8 events and its intake queue 8 more, while the replay
    # is held to 2 calls/s; live events arriving meanwhile must not queue behind its backlog
    rate, share, n = 20, 0.1, 60
    data = stack.config(rate=f"{rate}/s", burst=2)
    data["worker"]["in_flight"] = 8
    config = stack.write_config(data)
    stack.start_worker(config)
    await stack.produce([(f"r{i}", page_view(i, user=f"r{i}", ip=f"10.7.1.{i}")) for i in range(n)])
    await stack.collect(expected=n, timeout=60)
    replay_id = await start_replay(stack, config, share=share)
    await stack.collect_replayed(replay_id, 2)  # running, its backlog queued
    live = [(f"l{i}", page_view(2000 + i, user=f"l{i}", ip=f"10.8.1.{i}")) for i in range(20)]
    started = time.monotonic()
    await stack.produce(live)
    got = await stack.collect_at_least(n + len(live), timeout=30)
    took = time.monotonic() - started

    await stack.enricher("replay", "cancel", replay_id, "--config", str(config))
    assert len(got.outputs) == n + len(live)
    # 20 calls at the 18/s live has left take about a second; behind the backlog, 15-25 s
    assert took < 8, f"live events took {took:.1f}s behind the replay"
    assert len(got.replay_outputs) < n  # the replay was still running meanwhile


async def test_dry_run_estimate_matches_the_replay_within_ten_percent(
    stack: Stack, sandbox: SandboxServer
) -> None:
    # The estimate assumes the replay gets its whole share: true when live traffic leaves room
    # (live goes first when both want the whole rate, see the cold replay test above).
    rate, share, n = 20, 0.5, 40
    config = stack.write_config(stack.config(rate=f"{rate}/s", burst=2))
    stack.start_worker(config)
    await stack.produce([(f"r{i}", page_view(i, user=f"r{i}", ip=f"10.9.0.{i}")) for i in range(n)])
    await stack.collect(expected=n, timeout=60)
    plan = json.loads(
        await stack.enricher(
            "replay",
            "--config",
            str(config),
            "--from",
            "-1h",
            "--dry-run",
            "--json",
            "--share",
            str(share),
        )
    )
    assert (plan["events"], plan["calls_needed"]) == (n, n)  # cache off: every event calls
    replay_id = await start_replay(stack, config, share=share)
    got = await stack.collect_replayed(replay_id, n, timeout=60)
    replay_span = (max(got.replay_times) - min(got.replay_times)) / 1000
    assert abs(plan["seconds"] - replay_span) <= 0.1 * plan["seconds"]
    assert sandbox.stats()["calls"] == 2 * n


async def test_cancel_stops_a_replays_calls_within_a_second(
    stack: Stack, sandbox: SandboxServer
) -> None:
    n = 60
    config = stack.write_config(stack.config(rate="10/s", burst=2))
    stack.start_worker(config)
    await stack.produce([(f"u{i}", page_view(i, user=f"u{i}")) for i in range(n)])
    await stack.collect(expected=n, timeout=60)
    replay_id = await start_replay(stack, config, share=0.5)
    await stack.collect_replayed(replay_id, 5)
    await stack.enricher("replay", "cancel", replay_id, "--config", str(config))
    await asyncio.sleep(1.0)  # the promised reaction time
    calls_after_cancel = sandbox.stats()["calls"]
    await asyncio.sleep(2.0)  # would be 10 more calls at the replay's 5/s
    assert sandbox.stats()["calls"] == calls_after_cancel
    status = await status_of(stack, config, replay_id)
    assert status["state"] == "cancelled"
    assert status["outputs"] < n


async def test_replay_stops_at_its_quota_share_and_says_so_while_live_keeps_the_rest(
    stack: Stack, sandbox: SandboxServer
) -> None:
    n, quota, share = 30, 100, 0.2
    config = stack.write_config(stack.config(quotas=[f"{quota}/day"]))
    stack.start_worker(config)
    await stack.produce([(f"u{i}", page_view(i, user=f"u{i}")) for i in range(n)])
    await stack.collect(expected=n)
    replay_id = await start_replay(stack, config, share=share)
    cap = int(share * (quota - n))  # 14: its share of what was left
    async with asyncio.timeout(30):
        # polls the registry through the CLI, as an operator would
        while (status := await status_of(stack, config, replay_id))["state"] != "held":  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        await sandbox.wait_for_calls(n + cap)  # the last granted call
    assert "quota" in status["note"]
    assert status["quota_share"]["geo"]["day"] == {"cap": cap, "used": cap}
    # Outputs are written in offset order per partition: one enriched behind a held event
    # waits for it, so the replay's outputs may be fewer than its calls, never more.
    replayed = (await stack.collect_replayed(replay_id, 1)).replayed[replay_id]
    assert 1 <= replayed <= cap
    # live traffic still has the rest of the quota
    await stack.produce([(f"v{i}", page_view(500 + i, user=f"v{i}")) for i in range(10)])
    got = await stack.collect_at_least(n + 10)
    assert len(got.outputs) == n + 10 and got.replayed[replay_id] <= cap
    assert sandbox.stats()["calls"] == n + cap + 10  # the replay never went past its share


async def test_dead_letters_are_redriven_through_the_replay_lane(
    tmp_path: Any, kafka: Any, redis_service: Any
) -> None:
    n = 12
    api = await run_sandbox(SandboxSettings(fail_first_n=n, fail_status=503), port=0)
    stack = Stack(tmp_path, kafka_url=kafka.url, redis_url=redis_service.url, api_url=api.url)
    try:
        await stack.create_topics()
        # no circuit breaker: it would hold these events instead of dead-lettering them
        config = stack.write_config(stack.config(retry={"attempts": 1}, circuit={"failures": 0}))
        stack.start_worker(config)
        await stack.produce([(f"u{i}", page_view(i, user=f"u{i}")) for i in range(n)])
        first = await stack.collect(expected=n)
        assert len(first.dead_letters) == n  # the outage's victims
        assert {d["error"]["status"] for d in first.dead_letters} == {503}
        out = await stack.enricher(
            "dlq",
            "redrive",
            "--config",
            str(config),
            "--kind",
            "http_status",
            "--status",
            "503",
            "--yes",
            "--detach",
        )
        replay_id = last_line(out)
        got = await stack.collect_replayed(replay_id, n)
    finally:
        stack.stop_all()
        await api.close()
    assert len(got.replay_outputs) == n  # all re-enriched now that the API answers
    assert {s for s, _ in got.replay_outputs} == set(first.sources)


async def test_one_call_for_fifty_identical_events_across_two_workers(
    stack: Stack, sandbox: SandboxServer
) -> None:
    sandbox.update(latency=0.3)  # long enough for all 50 to be in flight together
    config = stack.write_config(stack.config(cache_ttl="1h"))
    stack.start_worker(config)
    stack.start_worker(config)
    await stack.wait_for_members(2)
    await stack.produce(
        [(f"u{i}", page_view(i, user=f"u{i}", ip="203.0.113.9")) for i in range(50)]
    )
    got = await stack.collect(expected=50)
    assert len(got.outputs) == 50
    assert sandbox.stats()["calls"] == 1
