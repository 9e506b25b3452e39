"""What one worker counts about its API calls, and its Prometheus exposition.

The counting happens at two seams of the runtime, without touching the caller or the limiter:

    MeteredClient    around ApiCaller.call: one call per event and rule, counted by outcome
                     (``ok`` or the CallError kind); a cached answer is an ``ok`` call
    MeteredLimiter   around the limiter: tokens granted and the time each one took to get
    metered_session  around the worker's aiohttp session: every HTTP attempt (first tries
                     and retries) by result: ``2xx``, ``3xx``, ``4xx``, ``429``, ``5xx``,
                     ``timeout``, ``connection``, ``error``

The limiter proxy tells the session which API an attempt is for through a context variable: the
caller takes its token and makes the request in the same task.

:class:`MetricsCollector` turns a worker snapshot (see :mod:`enricher.monitor`) into Prometheus
families on a registry of its own (never the global one), served at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final, cast

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .errors import EventError
from .lanes import Lane

__all__ = [
    "CALL_OUTCOMES",
    "METRICS_CONTENT_TYPE",
    "WAIT_BUCKETS",
    "ApiStats",
    "MeteredClient",
    "MeteredLimiter",
    "MetricsCollector",
    "WaitHistogram",
    "WorkerStats",
    "metered_session",
    "new_registry",
    "render_metrics",
]

CALL_OUTCOMES: Final = (
    "ok",
    "invalid_event",
    "http_status",
    "timeout",
    "connection",
    "bad_response",
)
# seconds; limiter waits range from nothing to a quota period's end
WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW: Final = 10.0  # seconds over which calls/s and tokens/s are averaged

Clock = Callable[[], float]

# The API whose limiter token the current task took last: the attempt the session sees is its.
_CURRENT_API: ContextVar[str | None] = ContextVar("enricher_current_api", default=None)


class WaitHistogram:
    """Limiter waits: counts per bucket (not cumulative), their sum and count."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(WAIT_BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: ``(upper bound, observations at or below it)``."""
        total, out = 0, []
        for bound, n in zip((*WAIT_BUCKETS, float("inf")), self.buckets, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


@dataclass(slots=True)
class ApiStats:
    """Counters of one API in this worker, since it started."""

    calls: Counter[str] = field(default_factory=Counter)  # outcome -> calls
    attempts: Counter[str] = field(default_factory=Counter)  # result -> HTTP attempts
    retries_denied: Counter[str] = field(default_factory=Counter)  # "deadline" / "budget" -> n
    grants: int = 0  # limiter tokens granted (each one is also a quota unit)
    waits: WaitHistogram = field(default_factory=WaitHistogram)
    in_flight: int = 0  # calls being made now (waiting for a token included)
    waiting: int = 0  # of which waiting for a limiter token
    _samples: deque[tuple[float, int, int, int]] = field(default_factory=lambda: deque(maxlen=64))

    @property
    def errors(self) -> int:
        """Calls that failed (the event became a dead letter)."""
        return sum(n for outcome, n in self.calls.items() if outcome != "ok")

    def sample(self, now: float) -> None:
        self._samples.append((now, self.calls.total(), self.attempts.total(), self.grants))

    def rates(self) -> dict[str, float]:
        """Calls, attempts and tokens per second over about the last :data:`RATE_WINDOW`."""
        samples = self._samples
        if len(samples) < 2:
            return {"calls": 0.0, "attempts": 0.0, "grants": 0.0}
        last = samples[-1]
        first = next((s for s in samples if last[0] - s[0] <= RATE_WINDOW), samples[-2])
        if first is last:
            first = samples[-2]
        span = last[0] - first[0]
        if span <= 0:
            return {"calls": 0.0, "attempts": 0.0, "grants": 0.0}
        return {
            name: round((last[i] - first[i]) / span, 3)
            for i, name in ((1, "calls"), (2, "attempts"), (3, "grants"))
        }

    def as_dict(self) -> dict[str, Any]:
        rates = self.rates()
        return {
            "calls": dict(self.calls),
            "errors": self.errors,
            "attempts": dict(self.attempts),
            "status_429": self.attempts.get("429", 0),
            "retries_denied": dict(self.retries_denied),
            "grants": self.grants,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "limiter_waits": self.waits.count,
            "limiter_wait_seconds": round(self.waits.sum, 6),
            "calls_per_second": rates["calls"],
            "attempts_per_second": rates["attempts"],
            "grants_per_second": rates["grants"],
        }


class WorkerStats:
    """Per-API counters of one worker."""

    def __init__(self, apis: Iterable[str] = (), *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.apis: dict[str, ApiStats] = {name: ApiStats() for name in apis}

    def api(self, name: str) -> ApiStats:
        stats = self.apis.get(name)
        if stats is None:
            stats = self.apis[name] = ApiStats()
        return stats

    def sample(self) -> None:
        """Take a reading for the moving rates (the heartbeat does, every couple of seconds)."""
        now = self._clock()
        for stats in self.apis.values():
            stats.sample(now)


class MeteredLimiter:
    """Delegates to a limiter, timing each token wait and counting the tokens granted."""

    def __init__(self, inner: Any, stats: WorkerStats, *, clock: Clock = time.monotonic) -> None:
        self._inner = inner
        self._stats = stats
        self._clock = clock

    async def acquire(
        self, api: str, lane: Lane | None = None, seat: asyncio.Semaphore | None = None
    ) -> int | None:
        """The inner limiter's grant (its number goes back with the server's rate-limit
        headers, see ``limiter.server_signal``), with ``seat`` taken."""
        _CURRENT_API.set(api)  # in the caller's task: the request that follows is for ``api``
        stats = self._stats.api(api)
        started = self._clock()
        stats.waiting += 1
        try:
            grant: int | None = await self._inner.acquire(api, lane, seat)
        finally:
            stats.waiting -= 1
        stats.grants += 1
        stats.waits.observe(max(0.0, self._clock() - started))
        return grant

    async def block(self, api: str, seconds: float) -> None:
        await self._inner.block(api, seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class MeteredClient:
    """Delegates to the API caller, counting each call by outcome and the calls in flight."""

    def __init__(self, inner: Any, stats: WorkerStats) -> None:
        self._inner = inner
        self._stats = stats

    async def call(self, api: str, params: Mapping[str, Any], lane: Lane | None = None) -> Any:
        stats = self._stats.api(api)
        stats.in_flight += 1
        try:
            result = await self._inner.call(api, params, lane)
        except EventError as exc:
            stats.calls[exc.kind] += 1
            stopped = getattr(exc, "retry_stopped", None)
            if stopped is not None:
                stats.retries_denied[stopped] += 1
            raise
        finally:
            stats.in_flight -= 1
        stats.calls["ok"] += 1
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _status_result(status: int) -> str:
    return "429" if status == 429 else f"{status // 100}xx"


def _exception_result(exc: BaseException) -> str | None:
    if not isinstance(exc, Exception):
        return None  # cancelled (shutdown): no answer to count
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return "connection"
    return "error"


def metered_session(session: aiohttp.ClientSession, stats: WorkerStats) -> aiohttp.ClientSession:
    """``session`` counting each HTTP attempt by result, under the API of the limiter token its
    task took last. (An aiohttp trace would do the same at several signal objects per request:
    measured 7% of a worker's CPU per event.) The caller only uses ``request``, awaited (not
    entered), and releases the response itself."""
    return cast(aiohttp.ClientSession, _MeteredSession(session, stats))


class _MeteredSession:
    """``await session.request(...)``, counting the attempt once its answer (status line and
    headers) or its failure is in: where aiohttp's request-end and request-exception trace
    signals fire."""

    __slots__ = ("_inner", "_stats")

    def __init__(self, inner: aiohttp.ClientSession, stats: WorkerStats) -> None:
        self._inner = inner
        self._stats = stats

    async def request(self, method: str, url: Any, **kwargs: Any) -> aiohttp.ClientResponse:
        try:
            response = await self._inner.request(method, url, **kwargs)
        except BaseException as exc:
            self._count(_exception_result(exc))
            raise
        self._count(_status_result(response.status))
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _count(self, result: str | None) -> None:
        api = _CURRENT_API.get()
        if api is not None and result is not None:
            self._stats.api(api).attempts[result] += 1
            _CURRENT_API.set(None)


# --- Prometheus --------------------------------------------------------------------------------


class MetricsCollector(Collector):
    """Builds every family at scrape time from ``snapshot()`` (see :mod:`enricher.monitor`) and
    the limiter-wait histograms of ``stats``."""

    def __init__(
        self, snapshot: Callable[[], Mapping[str, Any]], stats: Callable[[], WorkerStats | None]
    ) -> None:
        self._snapshot = snapshot
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _api_families(snap.get("apis", {}), self._stats())
        yield from _quota_families(snap.get("quotas", {}))
        yield from _circuit_families(snap.get("circuits", {}))
        yield from _cache_families(snap.get("cache", {}))
        yield from _pipeline_families(snap.get("pipelines", {}), snap.get("in_flight", {}))
        yield from _partition_families(snap.get("partitions", []))
        started = GaugeMetricFamily(
            "enricher_worker_start_time_seconds", "When this worker started (Unix time)."
        )
        started.add_metric([], float(snap.get("started_at", 0.0)))
        yield started


def _api_families(apis: Mapping[str, Any], stats: WorkerStats | None) -> Iterator[Metric]:
    calls = CounterMetricFamily(
        "enricher_api_calls",
        "API calls (one per event and rule; a cached answer counts) by outcome: ok or the "
        "dead-letter error kind.",
        labels=["api", "outcome"],
    )
    attempts = CounterMetricFamily(
        "enricher_api_attempts",
        "HTTP attempts (first tries and retries) by result: 2xx, 3xx, 4xx, 429, 5xx, timeout, "
        "connection, error.",
        labels=["api", "result"],
    )
    grants = CounterMetricFamily(
        "enricher_limiter_tokens", "Limiter tokens granted (one per attempt).", labels=["api"]
    )
    in_flight = GaugeMetricFamily(
        "enricher_api_calls_in_flight",
        "Calls being made now, waits for a token included.",
        labels=["api"],
    )
    waiting = GaugeMetricFamily(
        "enricher_limiter_waiting", "Calls waiting for a limiter token now.", labels=["api"]
    )
    denied = CounterMetricFamily(
        "enricher_retries_denied",
        "Retries not made because the event's deadline or the worker's retry budget refused "
        "them (the event became a dead letter), by reason: deadline or budget.",
        labels=["api", "reason"],
    )
    waits = HistogramMetricFamily(
        "enricher_limiter_wait_seconds",
        "Time each attempt waited for its limiter token.",
        labels=["api"],
    )
    for api, figures in sorted(apis.items()):
        for outcome in sorted(set(CALL_OUTCOMES) | set(figures.get("calls", {}))):
            calls.add_metric([api, outcome], float(figures.get("calls", {}).get(outcome, 0)))
        for result, n in sorted(figures.get("attempts", {}).items()):
            attempts.add_metric([api, result], float(n))
        grants.add_metric([api], float(figures.get("grants", 0)))
        in_flight.add_metric([api], float(figures.get("in_flight", 0)))
        waiting.add_metric([api], float(figures.get("waiting", 0)))
        for reason in ("budget", "deadline"):
            n = figures.get("retries_denied", {}).get(reason, 0)
            denied.add_metric([api, reason], float(n))
        histogram = stats.apis.get(api) if stats is not None else None
        if histogram is not None:
            waits.add_metric([api], histogram.waits.cumulative(), histogram.waits.sum)
    yield from (calls, attempts, grants, in_flight, waiting, denied, waits)


def _quota_families(quotas: Mapping[str, Any]) -> Iterator[Metric]:
    names = {
        "limit": "Quota of the current period (limits set overrides included).",
        "used": "Quota units used in the current period, by all workers (from Redis).",
        "remaining": "Quota units left in the current period (from Redis).",
        "resets_at": "When the current period ends (Unix time).",
    }
    families = {
        key: GaugeMetricFamily(
            f"enricher_quota_{key}{'_seconds' if key == 'resets_at' else ''}",
            text,
            labels=["api", "period"],
        )
        for key, text in names.items()
    }
    for api, periods in sorted(quotas.items()):
        for quota in periods:
            for key, family in families.items():
                family.add_metric([api, quota["period"]], float(quota[key]))
    yield from families.values()


def _circuit_families(circuits: Mapping[str, str]) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        "enricher_circuit_open",
        "1 when the API's circuit breaker holds calls (open, or half-open: one probe at a time), "
        "0 when closed (from Redis).",
        labels=["api"],
    )
    for api, state in sorted(circuits.items()):
        gauge.add_metric([api], 0.0 if state == "closed" else 1.0)
    yield gauge


def _cache_families(cache: Mapping[str, Any]) -> Iterator[Metric]:
    lookups = CounterMetricFamily(
        "enricher_cache_lookups",
        "Response-cache lookups by result: hit (stored answer), miss, wait (answered by another "
        "worker's call), shared (answered by a call of this worker in flight).",
        labels=["result"],
    )
    for result in ("hits", "misses", "waits", "shared"):
        lookups.add_metric([result.removesuffix("s")], float(cache.get(result, 0)))
    yield lookups


def _pipeline_families(
    pipelines: Mapping[str, Any], in_flight: Mapping[str, Any]
) -> Iterator[Metric]:
    events = CounterMetricFamily(
        "enricher_events",
        "Events finished by lane (live, replay) and outcome: output, dead_letter, dropped, "
        "cancelled (a cancelled replay's), abandoned (left unacked at shutdown or revocation).",
        labels=["lane", "outcome"],
    )
    dead = CounterMetricFamily(
        "enricher_dead_letters", "Dead letters by lane and error kind.", labels=["lane", "kind"]
    )
    running = GaugeMetricFamily(
        "enricher_events_in_flight", "Events being enriched now, by lane.", labels=["lane"]
    )
    outcomes = (
        ("outputs", "output"),
        ("dead_letters", "dead_letter"),
        ("dropped", "dropped"),
        ("cancelled", "cancelled"),
        ("abandoned", "abandoned"),
    )
    for lane, stats in sorted(pipelines.items()):
        for key, outcome in outcomes:
            events.add_metric([lane, outcome], float(stats.get(key, 0)))
        for kind, n in sorted(stats.get("dead_letters_by_kind", {}).items()):
            dead.add_metric([lane, kind], float(n))
        running.add_metric([lane], float(in_flight.get(lane, 0)))
    yield from (events, dead, running)


def _partition_families(partitions: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    labels = ["topic", "partition"]
    lag = GaugeMetricFamily(
        "enricher_partition_lag",
        "About how many records of the partition are not committed yet (consumer highwater "
        "minus committed offset).",
        labels=labels,
    )
    committed = GaugeMetricFamily(
        "enricher_partition_committed_offset", "The group's committed offset.", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "enricher_partition_in_flight", "Events of the partition in flight.", labels=labels
    )
    oldest = GaugeMetricFamily(
        "enricher_partition_oldest_in_flight_age_seconds",
        "How long the lowest uncommitted offset has been in flight (0: nothing in flight).",
        labels=labels,
    )
    stalled = GaugeMetricFamily(
        "enricher_partition_stalled_seconds",
        "How long the partition has had work without its committed offset moving.",
        labels=labels,
    )
    stuck = GaugeMetricFamily(
        "enricher_partition_stuck",
        "1 when the partition has had work and no committed progress for over 60 s.",
        labels=labels,
    )
    for part in partitions:
        key = [part["topic"], str(part["partition"])]
        if part.get("lag") is not None:
            lag.add_metric(key, float(part["lag"]))
        if part.get("committed") is not None:
            committed.add_metric(key, float(part["committed"]))
        in_flight.add_metric(key, float(part.get("in_flight", 0)))
        oldest.add_metric(key, float(part.get("oldest_age") or 0.0))
        stalled.add_metric(key, float(part.get("stalled_for", 0.0)))
        stuck.add_metric(key, 1.0 if part.get("stuck") else 0.0)
    yield from (lag, committed, in_flight, oldest, stalled, stuck)


def new_registry(collector: Collector) -> CollectorRegistry:
    """A registry of this worker's own (no process or platform collectors, no global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The text exposition format (0.0.4)."""
    return generate_latest(registry)
