"""Scenarios where a part of the stack goes away: workers, Redis, the broker."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import defaultdict

from .checker import recovery_time
from .scenario import Result, api, finish, geo_rule, page_view
from .stack import ChaosStack, Scene, say

__all__ = ["broker_outage", "crashes", "redis_down", "redis_empty", "sigterm"]

RATE, BURST = 50.0, 10
LIMITS = {"/geo/": (RATE, BURST)}
IN_FLIGHT = 64


async def _scene(stack: ChaosStack, name: str, workers: int, rate: float = RATE) -> Scene:
    scene = Scene(stack, name)
    scene.config({"geo": api("/geo/{ip}", rate, BURST)}, [geo_rule()])
    await scene.start()
    for _ in range(workers):
        scene.start_worker()
    return scene


def longest_partition_gap(scene: Scene, start: float, end: float) -> float:
    """The longest time, between ``start`` and ``end``, that one input partition wrote nothing."""
    by_partition: dict[str, list[float]] = defaultdict(list)
    for when, source in scene.arrivals:
        if start <= when <= end:
            by_partition[source.rsplit("/", 1)[0]].append(when)
    gaps = [0.0]
    for times in by_partition.values():
        times.sort()
        gaps += [b - a for a, b in itertools.pairwise(times)]
    return max(gaps)


async def crashes(stack: ChaosStack, scale: float) -> Result:
    """SIGKILL one of three workers every 10 s (restarting it at once) under 40 events/s."""
    result = Result("crashes")
    duration, every = max(12.0, 60.0 * scale) + 1, 10.0 * min(1.0, scale * 2)
    scene = await _scene(stack, "crashes", 3)
    try:
        await scene.produce(page_view(i) for i in range(5))
        await scene.wait_for("first output", lambda: bool(scene.seen), 60)
        kills = 0

        async def killer() -> None:
            nonlocal kills
            while True:
                await asyncio.sleep(every)
                victim = scene.workers[-3]  # the oldest of the three alive
                say(f"  SIGKILL {victim.log_path.stem} and restart it")
                victim.kill()
                scene.start_worker()
                kills += 1

        load_start = time.time()
        task = asyncio.ensure_future(killer())
        await scene.produce_paced(lambda i: page_view(i + 5), 40.0, duration)
        task.cancel()
        await scene.drain(120)
        result.recover_s = longest_partition_gap(scene, load_start + 5, time.time())
        window = kills * 2 * IN_FLIGHT
        finish(result, scene, LIMITS, allow_duplicates=window)
        result.figures["kills"] = kills
    finally:
        await scene.close()
    return result


async def sigterm(stack: ChaosStack, scale: float) -> Result:
    """SIGTERM one of two workers while its events wait for tokens: it stops within 10 s and
    nothing is written twice."""
    result = Result("sigterm")
    scene = await _scene(stack, "sigterm", 2, rate=20.0)
    try:
        total = int(400 * max(scale, 0.25))
        await scene.produce(page_view(i) for i in range(total))
        await scene.wait_for("40 outputs", lambda: len(scene.seen) >= 40, 60)
        signalled = time.time()
        stop_s = await scene.workers[0].terminate(15.0)
        say(f"  worker0 stopped in {stop_s:.1f}s after SIGTERM")
        await scene.drain(total / 20 + 60)
        finish(result, scene, {"/geo/": (20.0, BURST)})
        result.recover_s = stop_s
        result.figures["stop_s"] = round(stop_s, 2)
        result.figures["duplicates_first_written"] = _when_written(scene, signalled, stop_s)
        result.check("stops within 10 s of SIGTERM", stop_s <= 10, f"{stop_s:.1f} s")
    finally:
        await scene.close()
    return result


def _when_written(scene: Scene, signalled: float, stop_s: float) -> dict[str, int]:
    """Where the first copy of each duplicated input was written: before the SIGTERM, during
    the stopping worker's grace, or after it had exited (then the survivor wrote it twice)."""
    first: dict[str, float] = {}
    copies: dict[str, int] = defaultdict(int)
    for when, source in scene.arrivals:
        first.setdefault(source, when)
        copies[source] += 1
    found = {"before_sigterm": 0, "during_grace": 0, "after_exit": 0}
    for source, when in first.items():
        if copies[source] > 1:
            phase = "before_sigterm" if when < signalled else "during_grace"
            found["after_exit" if when > signalled + stop_s else phase] += 1
    return found


async def redis_down(stack: ChaosStack, scale: float) -> Result:
    """Redis stopped for 20 s under load (it comes back empty): no call without a token, nothing
    lost or dead-lettered, full rate within 5 s of its return."""
    result, outage = Result("redis-down"), max(5.0, 20.0 * scale)
    scene = await _scene(stack, "redis-down", 2)
    try:
        await scene.produce(page_view(i) for i in range(5))
        await scene.wait_for("first output", lambda: bool(scene.seen), 60)

        async def outage_task() -> tuple[float, float]:
            await asyncio.sleep(6)
            down = time.time()
            say("  Redis down")
            await stack.redis.astop()
            await asyncio.sleep(outage)
            await stack.redis.astart()
            say("  Redis back (empty)")
            return down, time.time()

        task = asyncio.ensure_future(outage_task())
        await scene.produce_paced(lambda i: page_view(i + 5), 40.0, outage + 14)
        down, up = await task
        await scene.drain(120)
        finish(result, scene, LIMITS)
        grace = IN_FLIGHT / RATE + 1  # tokens reserved just before the outage may go a bit later
        calls = [c["time"] for c in stack.api_calls(scene.started)]
        during = sum(1 for t in calls if down + grace <= t < up)
        result.recover_s = recovery_time(calls, up, RATE)
        result.figures |= {"calls_while_down": during, "outage_s": outage}
        result.check("no call without a token", during == 0, f"{during} calls while down")
        result.check(
            "full rate within 5 s", result.recover_s <= 5, f"{result.recover_s:.1f} s to 80%"
        )
    finally:
        await scene.close()
    return result


async def redis_empty(stack: ChaosStack, scale: float) -> Result:
    """Redis killed and restarted at once, empty, three times under a load over the limit: the
    limit still holds."""
    result = Result("redis-empty")
    scene = await _scene(stack, "redis-empty", 2)
    try:
        await scene.produce(page_view(i) for i in range(5))
        await scene.wait_for("first output", lambda: bool(scene.seen), 60)

        async def restarts() -> None:
            for _ in range(3):
                await asyncio.sleep(max(2.0, 5 * scale))
                say("  Redis killed and restarted empty")
                await asyncio.to_thread(stack.redis.kill)
                await stack.redis.astart()

        task = asyncio.ensure_future(restarts())
        await scene.produce_paced(lambda i: page_view(i + 5), 60.0, max(8.0, 20 * scale))
        await task
        await scene.drain(120)
        finish(result, scene, LIMITS)
    finally:
        await scene.close()
    return result


async def broker_outage(stack: ChaosStack, scale: float) -> Result:
    """The broker frozen (SIGSTOP) for 15 s under load, then resumed: the workers resume by
    themselves, nothing lost. (A hung broker: connections stay open and requests time out;
    ``broker-restart`` in ``broker.py`` stops and restarts one on S3 storage.)"""
    result, outage = Result("broker-outage"), max(5.0, 15.0 * scale)
    scene = await _scene(stack, "broker", 2)
    pid = stack.kafka.pid
    assert pid is not None
    try:
        await scene.produce(page_view(i) for i in range(5))
        await scene.wait_for("first output", lambda: bool(scene.seen), 60)

        async def freeze() -> float:
            await asyncio.sleep(5)
            say("  broker frozen (SIGSTOP)")
            os.killpg(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(outage)
            finally:
                os.killpg(pid, signal.SIGCONT)
            say("  broker resumed (SIGCONT)")
            return time.time()

        task = asyncio.ensure_future(freeze())
        await scene.produce_paced(lambda i: page_view(i + 5), 30.0, outage + 12)
        resumed = await task
        await scene.drain(120)
        finish(result, scene, LIMITS, allow_duplicates=2 * 2 * IN_FLIGHT)
        later = [when for when, _ in scene.arrivals if when >= resumed]
        result.recover_s = (min(later) - resumed) if later else float("inf")
        result.figures["outage_s"] = outage
    finally:
        await scene.close()
    return result
