"""The scenarios: each ``measure_*`` runs once on a fresh :class:`Run` and returns its figures.

Figures are plain floats keyed by name (see :data:`FIGURES` in ``report.py`` for their labels);
``extra`` carries what goes to the JSON file only (per-command Redis calls and so on).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from enricher.quota import reset_overrides, set_overrides

from .stack import BenchStack, RedisCounts, Run, events_per_second, page_view, say, span_seconds

__all__ = ["SCENARIOS", "Measured", "Options", "Scenario"]

FAST_RATE = 100_000.0  # calls/s: a limit that never binds here


@dataclass(frozen=True, slots=True)
class Options:
    events: int = 2000
    runs: int = 3
    share: float = 0.5  # the replays' share of the rate
    cold_rate: float = 200.0  # the binding rate of the cold replay (calls/s)
    cold_burst: int = 20
    concurrency: int = 32  # apis.geo.concurrency (the default), and the bare client's
    in_flight: int = 256  # worker.in_flight (the default)


@dataclass
class Measured:
    figures: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _per_event(redis: RedisCounts, events: int) -> dict[str, float]:
    """Calls per command (Lua's included), per event."""
    return {name: round(n / events, 3) for name, n in sorted(redis.commands.items())}


def _rss(run: Run, measured: Measured) -> None:
    rss = run.worker_rss_mb()
    measured.figures["worker_rss_mb"] = rss if rss is not None else math.nan


async def _live_phase(run: Run, options: Options, *, produced: bool = False) -> None:
    """``events`` page views through one worker: produced while it joins (a joining worker takes
    ~4 s, so they are all in the topic before it reads), unless already ``produced``."""
    run.start_worker()
    if not produced:
        await run.produce(options.events)
    await run.wait_live(options.events, timeout=60 + options.events / 50)


async def _replay_phase(
    stack: BenchStack, run: Run, options: Options, measured: Measured, *, timeout: float
) -> None:
    n = options.events
    calls0, mark = await stack.sandbox_calls(), await stack.redis_mark()
    replay_id = await run.replay(options.share)
    await run.wait_replay(replay_id, n, timeout)
    calls1, redis = await stack.sandbox_calls(), await stack.redis_since(mark)
    times = run.tail.replay_times[replay_id]
    round_trips, commands = redis.per_event(n)
    measured.figures |= {
        "replay_events_per_s": events_per_second(times),
        "replay_api_calls": calls1 - calls0,
        "replay_redis_round_trips_per_event": round_trips,
        "replay_redis_commands_per_event": commands,
    }
    measured.extra |= {
        "replay_span_s": span_seconds(times),
        "replay_redis_commands_per_event": _per_event(redis, n),
    }
    _rss(run, measured)
    measured.extra["replay_state"] = await _final_state(run, replay_id)


async def _final_state(run: Run, replay_id: str) -> str:
    """The replay's state once its last outcomes are counted (a second or so after the outputs)."""
    state = "unknown"
    for _ in range(10):
        state = await run.replay_state(replay_id)
        if state != "running":
            break
        await asyncio.sleep(0.5)
    return state


async def measure_replay_warm(stack: BenchStack, run: Run, options: Options) -> Measured:
    """Live with ``cache_ttl: 1h`` and a limit that never binds; then a replay of it all."""
    measured = Measured()
    run.write_config(
        options.in_flight, options.concurrency, rate=f"{FAST_RATE:g}/s", cache_ttl="1h"
    )
    await run.start()
    calls0 = await stack.sandbox_calls()
    await _live_phase(run, options)
    measured.figures["live_events_per_s"] = events_per_second(run.tail.live_times)
    measured.figures["live_api_calls"] = await stack.sandbox_calls() - calls0
    say(f"  live: {options.events} events out; replaying (share {options.share:g})")
    await _replay_phase(stack, run, options, measured, timeout=60 + options.events / 20)
    return measured


async def measure_replay_cold(stack: BenchStack, run: Run, options: Options) -> Measured:
    """Live without cache (limit raised at run time so it does not bind); then the config's
    binding limit back, and a replay at ``share`` of it."""
    measured = Measured()
    rate, burst, share = options.cold_rate, options.cold_burst, options.share
    run.write_config(
        options.in_flight, options.concurrency, rate=f"{rate:g}/s", burst=burst, cache_ttl="0"
    )
    await run.start()
    await set_overrides(stack.redis, run.app_id, "geo", rate=FAST_RATE, burst=1000)
    await _live_phase(run, options)
    await reset_overrides(stack.redis, run.app_id, "geo")  # back to rate/burst of the config
    say(f"  live: {options.events} events out; replaying (share {share:g} of {rate:g}/s)")
    expected = options.events / (share * rate)
    await _replay_phase(stack, run, options, measured, timeout=60 + 3 * expected)
    span = measured.extra["replay_span_s"]
    replay_burst = max(1, math.floor(burst * share))  # the replay lane's own bucket size
    calls = measured.figures["replay_api_calls"]
    per_second = (calls - replay_burst) / span if span > 0 else math.nan
    measured.figures |= {
        "replay_calls_per_s": per_second,
        "replay_limit_ratio": per_second / (share * rate),
    }
    measured.extra |= {"limit": f"{rate:g}/s burst {burst}", "share": share}
    return measured


async def measure_live_overhead(stack: BenchStack, run: Run, options: Options) -> Measured:
    """One worker against the zero-latency sandbox with a limit that never binds, on ``events``
    pre-produced events; then a bare aiohttp client at the same concurrency as a ceiling."""
    measured = Measured()
    n = options.events
    run.write_config(options.in_flight, options.concurrency, rate=f"{FAST_RATE:g}/s", cache_ttl="0")
    await run.start()
    await run.produce(n)
    mark = await stack.redis_mark()
    run.start_worker()
    # The worker's CPU time from its first output to its last (start-up left out), per event.
    await run.wait_first_live(timeout=60)
    cpu0, seen0 = run.worker_cpu_seconds(), len(run.tail.live_times)
    await run.wait_live(n, timeout=60 + n / 50)
    cpu1 = run.worker_cpu_seconds()
    redis = await stack.redis_since(mark)
    worker_rate = events_per_second(run.tail.live_times)
    if cpu0 is not None and cpu1 is not None and n > seen0:
        cpu_ms = (cpu1 - cpu0) * 1000 / (n - seen0)
        measured.figures |= {
            "worker_cpu_ms_per_event": cpu_ms,
            "worker_cpu_share": cpu_ms * worker_rate / 1000,
        }
    _rss(run, measured)
    await run.stop()  # the ceiling gets the machine to itself, like the worker had
    say(f"  worker: {worker_rate:,.0f} events/s; bare aiohttp client at {options.concurrency}...")
    ceiling = await bare_client(stack.sandbox_url, max(5 * n, 5000), options.concurrency)
    measured.figures |= {
        "worker_events_per_s": worker_rate,
        "client_requests_per_s": ceiling,
        "worker_to_client_ratio": worker_rate / ceiling,
    }
    round_trips, commands = redis.per_event(n)
    measured.figures |= {
        "redis_round_trips_per_event": round_trips,
        "redis_commands_per_event": commands,
    }
    measured.extra |= {
        "redis_commands_per_event": _per_event(redis, n),
        "worker_span_s": span_seconds(run.tail.live_times),
    }
    return measured


async def bare_client(base_url: str, requests: int, concurrency: int) -> float:
    """Requests/s of ``concurrency`` tasks sending ``GET /geo/{ip}`` and reading the body, over
    one aiohttp session (connection pool of ``concurrency``), ``requests`` in all."""
    paths = [f"{base_url}/geo/{page_view(i)['client']['ip']}" for i in range(requests)]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = iter(paths)

        async def loop() -> None:
            for url in queue:
                async with session.get(url) as response:
                    await response.read()
                    response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


Measure = Callable[[BenchStack, Run, Options], Awaitable[Measured]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    measure: Measure
    describe: Callable[[Options], str]


SCENARIOS = (
    Scenario(
        "replay-warm",
        measure_replay_warm,
        lambda o: f"{o.events} events live with cache_ttl 1h, then replayed (share {o.share:g})",
    ),
    Scenario(
        "replay-cold",
        measure_replay_cold,
        lambda o: (
            f"{o.events} events live, cache off, then replayed at share {o.share:g} "
            f"of {o.cold_rate:g}/s (burst {o.cold_burst})"
        ),
    ),
    Scenario(
        "live-overhead",
        measure_live_overhead,
        lambda o: (
            f"{o.events} pre-produced events, zero-latency API, limit {FAST_RATE:g}/s, "
            f"concurrency {o.concurrency}"
        ),
    ),
)
