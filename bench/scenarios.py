"""The scenarios: each ``measure_*`` runs once on a fresh :class:`Run` and returns its figures.

Figures are plain floats keyed by name (see :data:`FIGURES` in ``report.py`` for their labels);
``extra`` carries what goes to the JSON file only (per-command Redis calls and so on).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from enricher.quota import reset_overrides, set_overrides

from .compare import measure_footprint, measure_latency_bound, measure_overhead, measure_precision
from .options import FAST_RATE, Measured, Options
from .stack import SLOW_LATENCY, BenchStack, Run, say
from .stats import events_per_second, span_seconds

__all__ = ["FAST_RATE", "SCENARIOS", "Measured", "Options", "Scenario"]


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
        "replay_redis_commands_per_event": redis.commands_per_event(n),
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


Measure = Callable[[BenchStack, Run, Options], Awaitable[Measured]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    measure: Measure
    describe: Callable[[Options], str]


SCENARIOS = (
    Scenario(
        "overhead",
        measure_overhead,
        lambda o: (
            f"zero-latency API, limit {FAST_RATE:g}/s; {5 * o.events} events through enricher "
            f"(in_flight {o.in_flight}, concurrency {o.concurrency}), the forwarding-only "
            f"agent, enricher passing events through and a bare aiohttp client "
            f"({o.concurrency} concurrent); {2 * o.events} through the recipe (agent "
            f"concurrency {o.recipe_concurrency})"
        ),
    ),
    Scenario(
        "latency-bound",
        measure_latency_bound,
        lambda o: (
            f"API answering in {SLOW_LATENCY * 1000:g} ms, limit {o.slow_rate:g}/s: "
            f"one enricher worker, then one recipe process (at most {o.recipe_budget:g} s)"
        ),
    ),
    Scenario(
        "precision",
        measure_precision,
        lambda o: (
            f"{o.precision_workers} enricher workers sharing {o.precision_rate:g}/s, then "
            f"{o.precision_workers} recipe processes with AsyncLimiter({o.precision_rate:g}, 1); "
            f"{o.precision_events} events each"
        ),
    ),
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
        "footprint",
        measure_footprint,
        lambda o: (
            f"{o.events} events, one worker at in_flight {o.footprint_in_flight}, cache off, "
            f"one API: Redis round trips per event and RSS"
        ),
    ),
)
