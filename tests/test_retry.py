"""Retry policy: Retry-After parsing, full-jitter waits within bounds, what is (not) retried."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from functools import partial

import pytest

from enricher.errors import CallError, ShuttingDown
from enricher.retry import RetryPolicy, parse_retry_after

from .fakes import FakeRetry

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


Retry = partial(FakeRetry, attempts=5, backoff_max=10.0)


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1", 1.0),
        (" 120 ", 120.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("-5", 0.0),
        ("-0", 0.0),
        ("86400", 300.0),
        ("9" * 400, 300.0),
        ("Fri, 01 Mar 2024 12:00:30 GMT", 30.0),
        ("Friday, 01-Mar-24 12:00:30 GMT", 30.0),
        ("Fri Mar  1 12:00:30 2024", 30.0),
        ("Fri, 01 Mar 2024 11:00:00 GMT", 0.0),
        ("Fri, 01 Mar 2100 11:00:00 GMT", 300.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("1e3", None),
        ("inf", None),
        ("NaN", None),
        ("Fri, 99 Mar 2024 11:00:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW, cap=300.0) == seconds


def test_parse_retry_after_with_naive_now_is_utc() -> None:
    header = format_datetime(NOW + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(header, now=NOW.replace(tzinfo=None), cap=60) == 7.0


async def _run(policy: RetryPolicy, sleep: FakeSleep, errors: list[BaseException]) -> int:
    """Run a call that raises the given errors in turn, then succeeds; return attempts made."""
    calls = 0
    async for attempt in policy.retrying(sleep):
        with attempt:
            calls += 1
            if errors:
                raise errors.pop(0)
    return calls


def _retriable(retry_after: float | None = None) -> CallError:
    return CallError("http_status", "HTTP 503", status=503, retriable=True, retry_after=retry_after)


async def test_jittered_delays_stay_within_bounds_and_windows() -> None:
    settings = Retry(attempts=8, backoff_min=0.1, backoff_max=2.0)
    sleep = FakeSleep()
    for _ in range(50):
        policy = RetryPolicy(settings, api="geo")
        await _run(policy, sleep, [_retriable() for _ in range(7)])
    assert len(sleep.delays) == 50 * 7
    for index, delay in enumerate(sleep.delays):
        retry_no = index % 7 + 1  # window after failed attempt n: [min, 2 * min * 2**(n-1)]
        assert 0.1 <= delay <= min(2.0, 0.2 * 2 ** (retry_no - 1))
    first_retries = sleep.delays[::7]
    assert len(set(first_retries)) > 40, "full jitter: first retries are spread, not in lockstep"
    assert max(sleep.delays) > 1.5, "late retries reach towards backoff_max"


async def test_retry_after_wins_and_is_capped() -> None:
    policy = RetryPolicy(Retry(backoff_min=0.1, backoff_max=1.0, max_retry_after=30.0), api="geo")
    sleep = FakeSleep()
    errors: list[BaseException] = [_retriable(5.0), _retriable(1000.0), _retriable(0.0)]
    assert await _run(policy, sleep, errors) == 4
    assert sleep.delays == [5.0, 30.0, 0.1]  # over backoff_max allowed; capped; floored at min


async def test_http_date_retry_after_flows_into_the_wait() -> None:
    header = format_datetime(NOW + timedelta(seconds=42), usegmt=True)
    seconds = parse_retry_after(header, now=NOW, cap=300.0)
    sleep = FakeSleep()
    await _run(RetryPolicy(Retry(), api="geo"), sleep, [_retriable(seconds)])
    assert sleep.delays == [42.0]


async def test_stops_after_attempts_and_reraises_the_call_error() -> None:
    sleep = FakeSleep()
    last = _retriable()
    errors: list[BaseException] = [_retriable(), _retriable(), last]
    with pytest.raises(CallError) as caught:
        await _run(RetryPolicy(Retry(attempts=3), api="geo"), sleep, errors)
    assert caught.value is last
    assert len(sleep.delays) == 2


@pytest.mark.parametrize(
    "error",
    [
        CallError("http_status", "HTTP 404", status=404),
        CallError("bad_response", "not JSON"),
        ShuttingDown("stopping"),
        RuntimeError("bug"),
    ],
)
async def test_only_retriable_call_errors_are_retried(error: BaseException) -> None:
    sleep = FakeSleep()
    with pytest.raises(type(error)) as caught:
        await _run(RetryPolicy(Retry(), api="geo"), sleep, [error])
    assert caught.value is error
    assert sleep.delays == []


async def test_retry_log_names_api_attempt_kind_status_not_the_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    error = CallError("timeout", "canary-SECRET-123", retriable=True)
    await _run(RetryPolicy(Retry(attempts=3), api="geo"), FakeSleep(), [error])
    assert len(caplog.records) == 1
    text = caplog.text
    assert "geo" in text and "attempt 1 of 3" in text and "timeout" in text
    assert "canary-SECRET-123" not in text
