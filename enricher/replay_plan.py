"""The dry-run planner: what re-feeding some records would cost, without calling anything.

Feed it record values (:meth:`Planner.add`), then :meth:`Planner.estimate` with the cache lookup
and the current quota usage. Per API it counts the requests the rules would make, the distinct
ones (by the response cache's :func:`~enricher.cache.request_key`), those already cached, and the
calls still needed: distinct minus cached when the API is cached, else every request. Retries are
not included, nor cache entries expiring during a long replay. The duration assumes the replay
gets its whole share of each API's rate (live traffic may leave it less, never more); a quota runs
out first when the calls needed exceed the replay's share of what remains of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .cache import caches, request_key
from .config import ApiSettings, Config
from .enrich import decode_event
from .errors import InvalidEvent
from .quota import ApiUsage
from .rules import CompiledRule
from .units import QuotaPeriod

__all__ = ["ApiPlan", "Contains", "Planner", "QuotaPlan", "ReplayPlan", "RequestKey", "human"]

RequestKey = Callable[[ApiSettings, Mapping[str, Any]], str]
Contains = Callable[[str, Sequence[str]], Awaitable[list[bool]]]


@dataclass(frozen=True, slots=True)
class QuotaPlan:
    """One quota: ``budget`` is the replay's share of what ``remaining`` is left this period."""

    period: QuotaPeriod
    limit: int
    remaining: int
    budget: int
    runs_out: bool
    resets_at: datetime


@dataclass(frozen=True, slots=True)
class ApiPlan:
    """What the replay would ask of one API."""

    api: str
    requests: int
    distinct: int
    cached: int
    calls_needed: int
    cache_enabled: bool
    rate: float  # the API's effective rate, calls/s
    share: float
    quotas: tuple[QuotaPlan, ...]

    @property
    def replay_rate(self) -> float:
        return self.rate * self.share

    @property
    def seconds(self) -> float:
        """Time to make the calls needed at the replay's share of the rate."""
        return self.calls_needed / self.replay_rate if self.calls_needed else 0.0

    @property
    def runs_out(self) -> tuple[QuotaPeriod, ...]:
        """The periods whose quota share would be spent before the replay ends."""
        return tuple(q.period for q in self.quotas if q.runs_out)

    def as_dict(self) -> dict[str, Any]:
        return {
            "api": self.api,
            "requests": self.requests,
            "distinct_requests": self.distinct,
            "cached": self.cached,
            "calls_needed": self.calls_needed,
            "cache_enabled": self.cache_enabled,
            "rate_per_second": self.rate,
            "replay_rate_per_second": self.replay_rate,
            "seconds": self.seconds,
            "quotas": [
                {
                    "period": q.period,
                    "limit": q.limit,
                    "remaining": q.remaining,
                    "replay_budget": q.budget,
                    "runs_out": q.runs_out,
                    "resets_at": q.resets_at.isoformat(),
                }
                for q in self.quotas
            ],
            "quota_runs_out": list(self.runs_out),
        }


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """The dry run's answer. ``invalid`` events (bad JSON, a param missing) become dead letters;
    ``unmatched`` ones follow ``unmatched:``; neither calls an API."""

    events: int
    matched: int
    unmatched: int
    invalid: int
    share: float
    apis: tuple[ApiPlan, ...]

    @property
    def seconds(self) -> float:
        """Expected duration: the slowest API's (events call their APIs at once)."""
        return max((api.seconds for api in self.apis), default=0.0)

    @property
    def calls_needed(self) -> int:
        return sum(api.calls_needed for api in self.apis)

    @property
    def runs_out(self) -> bool:
        return any(api.runs_out for api in self.apis)

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "matched": self.matched,
            "unmatched": self.unmatched,
            "invalid": self.invalid,
            "share": self.share,
            "calls_needed": self.calls_needed,
            "seconds": self.seconds,
            "quota_runs_out": self.runs_out,
            "apis": [api.as_dict() for api in self.apis],
        }

    def render(self) -> str:
        """Human-readable lines."""
        lines = [
            f"events: {self.events:,} (matching a rule: {self.matched:,}, no rule: "
            f"{self.unmatched:,}, invalid: {self.invalid:,})",
            f"replay share: {self.share:g} of each API's rate and remaining quota",
        ]
        for api in self.apis:
            lines += _render_api(api)
        verdict = f"expected duration: about {human(self.seconds)}"
        if self.runs_out:
            verdict += " -- but a quota share runs out first: the replay would stop there (held)"
        return "\n".join([*lines, verdict])


def _render_api(api: ApiPlan) -> list[str]:
    cached = f"{api.cached:,} cached" if api.cache_enabled else "cache off"
    lines = [
        f"{api.api}: {api.requests:,} requests, {api.distinct:,} distinct, {cached} -> "
        f"{api.calls_needed:,} API calls needed (retries not included)",
        f"  rate {api.rate:g}/s, replay share {api.replay_rate:g}/s -> about {human(api.seconds)}",
    ]
    for q in api.quotas:
        verdict = f"RUNS OUT after {q.budget:,} calls" if q.runs_out else "enough"
        lines.append(
            f"  quota {q.limit:,}/{q.period}: {q.remaining:,} left, replay share {q.budget:,} "
            f"-> {verdict} (resets {q.resets_at.isoformat()})"
        )
    return lines


def human(seconds: float) -> str:
    """``45s``, ``4m 10s``, ``3h 20m``, ``2d 3h``."""
    whole = math.ceil(seconds)
    for big, small, size, unit in (
        (86_400, 3600, "d", "h"),
        (3600, 60, "h", "m"),
        (60, 1, "m", "s"),
    ):
        if whole >= big:
            rest = (whole % big) // small
            return f"{whole // big}{size}" + (f" {rest}{unit}" if rest else "")
    return f"{whole}s"


class Planner:
    """Counts events and requests as records are added; no I/O until :meth:`estimate`."""

    def __init__(self, config: Config, *, key: RequestKey = request_key) -> None:
        self._rules = tuple(CompiledRule(rule) for rule in config.enrichments)
        self._apis = config.apis
        self._key = key
        self._max_bytes = config.worker.max_event_bytes
        self.events = self.matched = self.unmatched = self.invalid = 0
        used = dict.fromkeys(rule.api for rule in self._rules)
        self._requests = dict.fromkeys(used, 0)
        self._distinct: dict[str, set[str]] = {name: set() for name in used}

    def add(self, value: bytes | None) -> None:
        """One record value, as a worker would see it."""
        self.events += 1
        try:
            event = decode_event(value, max_bytes=self._max_bytes)
            rules = [rule for rule in self._rules if rule.matches(event)]
            requests = [
                (rule.api, self._key(self._apis[rule.api], rule.request_params(event)))
                for rule in rules
            ]
        except InvalidEvent:
            self.invalid += 1
            return
        if not requests:
            self.unmatched += 1
            return
        self.matched += 1
        for api, key in requests:
            self._requests[api] += 1
            self._distinct[api].add(key)

    def add_all(self, values: Iterable[bytes | None]) -> None:
        for value in values:
            self.add(value)

    async def estimate(
        self, *, share: float, contains: Contains, usages: Mapping[str, ApiUsage]
    ) -> ReplayPlan:
        """The plan at ``share``; ``contains(api, keys)`` asks the response cache, ``usages``
        holds each API's current limits and quota usage (config values when absent)."""
        apis = []
        for name, keys in self._distinct.items():
            api = self._apis[name]
            usage = usages.get(name) or ApiUsage.build(api, {}, {}, 0.0, time.time())
            cache_on = caches(api)
            cached = sum(await contains(name, sorted(keys))) if cache_on and keys else 0
            needed = len(keys) - cached if cache_on else self._requests[name]
            apis.append(
                ApiPlan(
                    name,
                    self._requests[name],
                    len(keys),
                    cached,
                    needed,
                    cache_on,
                    usage.rate,
                    share,
                    _quotas(usage, share, needed),
                )
            )
        return ReplayPlan(
            self.events, self.matched, self.unmatched, self.invalid, share, tuple(apis)
        )


def _quotas(usage: ApiUsage, share: float, needed: int) -> tuple[QuotaPlan, ...]:
    plans = []
    for quota in usage.quotas:
        budget = math.floor(share * quota.remaining)
        plans.append(
            QuotaPlan(
                quota.period, quota.limit, quota.remaining, budget, needed > budget, quota.resets_at
            )
        )
    return tuple(plans)
