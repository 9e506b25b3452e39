"""The side-by-side scenarios: enricher against the hand-written recipe (``recipe.py``) and the
ceilings (a bare aiohttp client; a forwarding-only Faust agent, ``forward.py``), plus the
worker's footprint. Each side gets its own topics and consumer group in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from .options import FAST_RATE, Measured, Options
from .stack import SLOW_LATENCY, BenchStack, Run, page_view, say
from .stats import (
    bucket_excess,
    events_per_second,
    full_second_utilisation,
    per_second_counts,
    ratio,
    span_seconds,
    steady_rate,
)

__all__ = [
    "bare_client",
    "measure_footprint",
    "measure_latency_bound",
    "measure_overhead",
    "measure_precision",
]

STEADY_SKIP = 1.0  # seconds of output left out of a steady rate (start-up, the bucket's burst)


@contextlib.asynccontextmanager
async def side_run(stack: BenchStack, name: str) -> AsyncIterator[Run]:
    """A started extra :class:`Run` (its own topics and group), stopped on the way out."""
    run = stack.new_run(name)
    try:
        await run.start()
        yield run
    finally:
        await run.stop()


async def _cpu_ms_per_event(run: Run, count: int, timeout: float) -> float:
    """Wait for ``count`` outputs; the first process's CPU ms per event from its first output
    to the last (start-up left out); NaN where /proc is missing."""
    await run.wait_first_live(timeout=60)
    cpu0, seen0 = run.worker_cpu_seconds(), len(run.tail.live_times)
    await run.wait_live(count, timeout=timeout)
    cpu1 = run.worker_cpu_seconds()
    if cpu0 is None or cpu1 is None or count <= seen0:
        return math.nan
    return (cpu1 - cpu0) * 1000 / (count - seen0)


async def measure_overhead(stack: BenchStack, run: Run, options: Options) -> Measured:
    """Zero-latency API, a limit that never binds, pre-produced events for each side in turn
    (each alone on the machine): enricher's worker, then the forwarding-only agent (the two
    the second goal compares, side by side in time, on as many events: this VM drifts), then
    enricher passing events through and a bare aiohttp client at the same concurrency, all on
    5x ``events`` (each measured over a second or more); the recipe on 2x ``events``; and
    the one-core bound from the pass-through's and the bare client's CPU."""
    measured, n, many = Measured(), 2 * options.events, 5 * options.events
    run.write_config(options.in_flight, options.concurrency, rate=f"{FAST_RATE:g}/s", cache_ttl="0")
    await run.start()
    await run.produce(many)
    run.start_worker()
    cpu_ms = await _cpu_ms_per_event(run, many, timeout=60 + many / 50)
    enricher = events_per_second(run.tail.live_times)
    measured.figures |= {"enricher_cpu_ms_per_event": cpu_ms}
    await run.stop()
    say(f"  enricher: {enricher:,.0f} events/s; forwarding-only Faust agent...")
    async with side_run(stack, "forward") as side:
        await side.produce(many)
        side.start_app("bench.forward")
        measured.figures["forward_cpu_ms_per_event"] = await _cpu_ms_per_event(
            side, many, timeout=60 + many / 50
        )
        forward = events_per_second(side.tail.live_times)
    say(f"  forward: {forward:,.0f} events/s; enricher passing events through...")
    async with side_run(stack, "passthrough") as side:
        side.write_config(
            options.in_flight,
            options.concurrency,
            matching=False,
            rate=f"{FAST_RATE:g}/s",
            cache_ttl="0",
        )
        await side.produce(many)
        side.start_worker()
        passthrough_cpu_ms = await _cpu_ms_per_event(side, many, timeout=60 + many / 50)
        passthrough = events_per_second(side.tail.live_times)
    say(f"  pass-through: {passthrough:,.0f} events/s; bare aiohttp client...")
    client, client_cpu_ms = await bare_client(stack.sandbox_url, many, options.concurrency)
    say(f"  client: {client:,.0f} req/s; the recipe...")
    recipe_run = await _recipe_alone(stack, options, n, stack.sandbox_url, FAST_RATE)
    recipe = events_per_second(recipe_run.times)
    measured.figures |= {
        "recipe_cpu_ms_per_event": recipe_run.cpu_ms_per_event,
        "recipe_api_calls_per_event": ratio(recipe_run.api_calls, len(recipe_run.times)),
    }
    # One process on one core can do no better than its Kafka side plus a bare request.
    one_core = 1000 / (passthrough_cpu_ms + client_cpu_ms)
    measured.figures |= {
        "enricher_events_per_s": enricher,
        "passthrough_events_per_s": passthrough,
        "passthrough_cpu_ms_per_event": passthrough_cpu_ms,
        "client_cpu_ms_per_request": client_cpu_ms,
        "one_core_events_per_s": one_core,
        "one_core_to_client": ratio(one_core, client),
        "client_requests_per_s": client,
        "forward_events_per_s": forward,
        "recipe_events_per_s": recipe,
        "enricher_to_recipe": ratio(enricher, recipe),
        "enricher_to_forward": ratio(enricher, forward),
        "enricher_to_client": ratio(enricher, client),
    }
    measured.extra |= {
        "enricher_span_s": span_seconds(run.tail.live_times),
        "recipe_events_measured": len(recipe_run.times),
    }
    return measured


@dataclass(frozen=True, slots=True)
class RecipeRun:
    """What one recipe process did: its outputs' broker timestamps (ms), the API calls the
    sandbox saw meanwhile, and its CPU ms per event (first output to last)."""

    times: list[int]
    api_calls: int
    cpu_ms_per_event: float


async def _recipe_alone(
    stack: BenchStack, options: Options, n: int, api_url: str, rate: float
) -> RecipeRun:
    """One recipe process on ``n`` pre-produced events, measured until done or for
    ``recipe_budget`` seconds."""
    async with side_run(stack, "recipe") as side:
        await side.produce(n)
        calls0 = await stack.sandbox_calls(api_url)
        side.start_app(
            "bench.recipe", api_url=api_url, rate=rate, concurrency=options.recipe_concurrency
        )
        await side.wait_first_live(timeout=60)
        cpu0, seen0 = side.worker_cpu_seconds(), len(side.tail.live_times)
        await side.wait_live_or(n, budget=options.recipe_budget, timeout=60)
        cpu1, seen1 = side.worker_cpu_seconds(), len(side.tail.live_times)
        calls = await stack.sandbox_calls(api_url) - calls0
        times = list(side.tail.live_times)
    cpu_ms = math.nan
    if cpu0 is not None and cpu1 is not None and seen1 > seen0:
        cpu_ms = (cpu1 - cpu0) * 1000 / (seen1 - seen0)
    return RecipeRun(times, calls, cpu_ms)


async def measure_latency_bound(stack: BenchStack, run: Run, options: Options) -> Measured:
    """API answering in 50 ms, a limit of ``slow_rate``/s (burst a tenth of it): one worker's
    steady events/s (the first second left out) against the limit; then one recipe process."""
    measured, rate = Measured(), options.slow_rate
    n = max(options.events, int(2.5 * rate))
    burst = max(1, int(rate / 10))
    run.write_config(
        options.in_flight,
        options.concurrency,
        api_url=stack.slow_url,
        rate=f"{rate:g}/s",
        burst=burst,
        cache_ttl="0",
    )
    await run.start()
    await run.produce(n)
    run.start_worker()
    await run.wait_live(n, timeout=60 + 3 * n / rate)
    enricher = steady_rate(run.tail.live_times, STEADY_SKIP)
    await run.stop()
    say(f"  enricher: {enricher:,.1f} events/s of {rate:g}/s; the recipe...")
    recipe_run = await _recipe_alone(stack, options, n, stack.slow_url, rate)
    recipe = steady_rate(recipe_run.times, STEADY_SKIP)
    measured.extra["recipe_events_measured"] = len(recipe_run.times)
    measured.figures |= {
        "enricher_events_per_s": enricher,
        "enricher_to_limit": ratio(enricher, rate),
        "recipe_events_per_s": recipe,
        "recipe_to_limit": ratio(recipe, rate),
        "enricher_to_recipe": ratio(enricher, recipe),
    }
    measured.extra |= {"limit": f"{rate:g}/s burst {burst}", "latency_s": SLOW_LATENCY}
    return measured


async def measure_precision(stack: BenchStack, run: Run, options: Options) -> Measured:
    """``precision_workers`` enricher workers sharing ``precision_rate``/s (burst: one second's
    worth, the default) on ``precision_events`` events, then as many recipe processes with
    ``AsyncLimiter(rate, 1)`` each: what the zero-latency API saw, second by second."""
    measured, rate, workers = Measured(), options.precision_rate, options.precision_workers
    n = options.precision_events
    run.write_config(options.in_flight, options.concurrency, rate=f"{rate:g}/s", cache_ttl="0")
    await run.start()
    for _ in range(workers):
        run.start_worker()
    measured.figures |= await _limited(stack, run, "enricher", options)
    await run.stop()
    say("  enricher done; the recipe...")
    async with side_run(stack, "recipe") as side:
        for _ in range(workers):
            side.start_app(
                "bench.recipe",
                api_url=stack.sandbox_url,
                rate=rate,
                concurrency=options.recipe_concurrency,
            )
        measured.figures |= await _limited(stack, side, "recipe", options)
    measured.extra |= {"limit": f"{rate:g}/s burst {rate:g}", "workers": workers, "events": n}
    return measured


async def _limited(stack: BenchStack, run: Run, side: str, options: Options) -> dict[str, float]:
    """Once every process of ``run`` has joined: ``precision_events`` events through them, and
    the sandbox's per-second counts judged against a bucket of ``precision_rate`` (burst the
    same)."""
    rate, n = options.precision_rate, options.precision_events
    await run.wait_for_members(options.precision_workers, timeout=90)
    await stack.sandbox_reset()
    await run.produce(n)
    await run.wait_live(n, timeout=60 + 3 * n / rate)
    per_second = per_second_counts(await stack.sandbox_stats())
    excess = bucket_excess(per_second, rate, rate)
    return {
        f"{side}_max_calls_in_a_second": float(max(per_second.values(), default=0)),
        f"{side}_violations": float(len(excess)),
        f"{side}_excess_calls": float(sum(excess.values())),
        f"{side}_utilisation": full_second_utilisation(per_second, rate),
        f"{side}_calls": float(sum(per_second.values())),
    }


async def measure_footprint(stack: BenchStack, run: Run, options: Options) -> Measured:
    """One worker at ``in_flight`` ``footprint_in_flight``, cache off, one API, a limit that
    never binds: Redis round trips and commands per event (from once the worker has joined:
    start-up left out, its periodic work in), peak RSS."""
    measured, n = Measured(), options.events
    run.write_config(
        options.footprint_in_flight, options.concurrency, rate=f"{FAST_RATE:g}/s", cache_ttl="0"
    )
    await run.start()
    run.start_worker()
    await run.wait_for_members(1)
    mark = await stack.redis_mark()  # after the worker's start-up: only the events' work counts
    await run.produce(n)
    await run.wait_live(n, timeout=60 + n / 50)
    redis = await stack.redis_since(mark)
    round_trips, commands = redis.per_event(n)
    peak, end = run.worker_peak_rss_mb(), run.worker_rss_mb()
    measured.figures |= {
        "redis_round_trips_per_event": round_trips,
        "redis_commands_per_event": commands,
        "worker_peak_rss_mb": peak if peak is not None else math.nan,
        "worker_rss_mb": end if end is not None else math.nan,
        "events_per_s": events_per_second(run.tail.live_times),
    }
    measured.extra["redis_commands_per_event"] = redis.commands_per_event(n)
    return measured


async def bare_client(base_url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """Requests/s of ``concurrency`` tasks sending ``GET /geo/{ip}`` and reading the body, over
    one aiohttp session (connection pool of ``concurrency``), ``requests`` in all; and this
    process's CPU ms per request meanwhile."""
    paths = [f"{base_url}/geo/{page_view(i)['client']['ip']}" for i in range(requests)]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = iter(paths)

        async def loop() -> None:
            for url in queue:
                async with session.get(url) as response:
                    await response.read()
                    response.raise_for_status()

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        cpu_ms = (time.process_time() - cpu) * 1000 / requests
        return requests / (time.perf_counter() - started), cpu_ms
