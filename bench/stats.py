"""Pure figures from what the stack recorded: rates from broker timestamps, and what an API's
per-second call counts say about a limit (violations, utilisation). No I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "bucket_excess",
    "events_per_second",
    "full_second_utilisation",
    "per_second_counts",
    "ratio",
    "span_seconds",
    "steady_rate",
]


def per_second_counts(stats: Mapping[str, Any]) -> dict[int, int]:
    """The sandbox ``/stats`` ``calls_per_second`` as ``{epoch second: calls}``."""
    return {int(second): int(n) for second, n in stats.get("calls_per_second", {}).items()}


def bucket_excess(per_second: Mapping[int, int], rate: float, burst: float) -> dict[int, int]:
    """Calls beyond what a token bucket of ``rate``/s and ``burst`` could have let through, per
    second that had any (seconds with none are left out).

    The bucket starts full; in each whole second it can admit what it holds plus one second's
    refill; what is left (at most ``burst``) carries over. Counting by whole seconds is lenient
    (a real bucket refills continuously and wastes tokens at its cap mid-second), so a limiter
    that keeps to the bucket never shows an excess here.
    """
    excess: dict[int, int] = {}
    if not per_second:
        return excess
    level = burst
    first, last = min(per_second), max(per_second)
    for second in range(first, last + 1):
        calls = per_second.get(second, 0)
        allowed = level + rate
        over = max(0, calls - math.floor(allowed + 1e-9))
        if over:
            excess[second] = over
        level = min(burst, max(0.0, allowed - calls))
    return excess


def full_second_utilisation(per_second: Mapping[int, int], rate: float) -> float:
    """Mean calls per second over the seconds strictly between the first and the last with
    calls (those two are partial), over ``rate``; NaN with fewer than one such second."""
    if not per_second:
        return math.nan
    first, last = min(per_second), max(per_second)
    inner = range(first + 1, last)
    if not inner:
        return math.nan
    return sum(per_second.get(s, 0) for s in inner) / (len(inner) * rate)


def steady_rate(times_ms: Sequence[int], skip: float) -> float:
    """Events/s after the first ``skip`` seconds (a start-up burst left out): from the first
    timestamp at or after ``first + skip`` to the last; NaN when fewer than two are left."""
    if not times_ms:
        return math.nan
    ordered = sorted(times_ms)
    start = ordered[0] + skip * 1000
    kept = [t for t in ordered if t >= start]
    if len(kept) < 2 or kept[-1] == kept[0]:
        return math.nan
    return (len(kept) - 1) / ((kept[-1] - kept[0]) / 1000)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when either is NaN or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def events_per_second(times: list[int]) -> float:
    """(n - 1) / (last - first), from broker timestamps in ms: the rate between the two."""
    if len(times) < 2:
        return float("nan")
    span = (max(times) - min(times)) / 1000
    return (len(times) - 1) / span if span > 0 else float("inf")


def span_seconds(times: list[int]) -> float:
    """Seconds from the first timestamp (ms) to the last; 0 with none."""
    return (max(times) - min(times)) / 1000 if times else 0.0
