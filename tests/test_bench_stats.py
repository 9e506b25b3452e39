"""The bench's pure figures (bench/stats.py): no stack, no I/O."""

from __future__ import annotations

import math

import pytest

from bench.stats import (
    bucket_excess,
    events_per_second,
    full_second_utilisation,
    per_second_counts,
    ratio,
    span_seconds,
    steady_rate,
)


def test_per_second_counts_reads_the_sandbox_stats() -> None:
    stats = {"calls": 5, "calls_per_second": {"100": 3, "101": 2}}
    assert per_second_counts(stats) == {100: 3, 101: 2}
    assert per_second_counts({}) == {}


def test_a_limiter_keeping_to_the_bucket_shows_no_excess() -> None:
    # a full bucket of 40 spent at once, then 40/s: 80 in the first second is allowed
    assert bucket_excess({10: 80, 11: 40, 12: 40, 13: 12}, rate=40, burst=40) == {}
    # a quiet second refills the bucket (capped at the burst) for the next one
    assert bucket_excess({10: 40, 11: 0, 12: 80}, rate=40, burst=40) == {}
    # jitter across a boundary: 39 then 41 is one bucket's worth
    assert bucket_excess({10: 80, 11: 39, 12: 41}, rate=40, burst=40) == {}


def test_each_second_over_the_bucket_is_counted_with_its_excess() -> None:
    # three processes with AsyncLimiter(40, 1) each: 3 x (40 + 40), then 3 x 40
    per_second = {10: 240, 11: 120, 12: 120, 13: 30}
    assert bucket_excess(per_second, rate=40, burst=40) == {10: 160, 11: 80, 12: 80}


def test_gaps_between_seconds_refill_the_bucket() -> None:
    assert bucket_excess({10: 80, 13: 80}, rate=40, burst=40) == {}
    assert bucket_excess({10: 80, 11: 41}, rate=40, burst=40) == {11: 1}
    assert bucket_excess({}, rate=40, burst=40) == {}


def test_utilisation_uses_the_whole_seconds_only() -> None:
    # first and last seconds are partial: left out
    assert full_second_utilisation({10: 5, 11: 40, 12: 38, 13: 7}, rate=40) == pytest.approx(
        78 / 80
    )
    # a silent second in between counts as zero
    assert full_second_utilisation({10: 5, 12: 40, 13: 1}, rate=40) == pytest.approx(0.5)
    assert math.isnan(full_second_utilisation({10: 5, 11: 7}, rate=40))
    assert math.isnan(full_second_utilisation({}, rate=40))


def test_steady_rate_leaves_the_first_seconds_out() -> None:
    burst = [0] * 100  # 100 outputs at once, then one every 10 ms
    times = burst + [1000 + 10 * i for i in range(201)]
    assert steady_rate(times, skip=1.0) == pytest.approx(100.0)
    assert steady_rate(times, skip=0.0) == pytest.approx(300 / 3.0)
    assert math.isnan(steady_rate([], skip=1.0))
    assert math.isnan(steady_rate([0, 100], skip=1.0))


def test_ratio_is_nan_without_a_denominator() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 2.0))


def test_events_per_second_from_first_to_last_timestamp() -> None:
    assert events_per_second([2000, 1000, 1500]) == pytest.approx(2.0)  # 2 gaps over 1 s
    assert math.isnan(events_per_second([1000]))
    assert math.isinf(events_per_second([1000, 1000]))
    assert span_seconds([3000, 1000]) == 2.0
    assert span_seconds([]) == 0.0
