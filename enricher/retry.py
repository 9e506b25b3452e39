"""Retry policy for API calls, built once per API from its ``retry`` settings.

    stop   after ``attempts`` attempts in total (the first one included), or when the event's
           ``deadline`` or the worker's retry ``budget`` refuses the retry (:mod:`.retry_limits`)
    wait   the server's ``Retry-After`` when it sent one (capped), otherwise full jitter:
           a random delay in [backoff_min, min(backoff_max, 2 * backoff_min * 2**(n-1))]
    retry  only a CallError whose ``retriable`` is true; anything else (ShuttingDown,
           cancellation, programming errors) propagates at once, unchanged

Retries are logged with the API name, attempt, error kind and status only: never the exception's
text, which for library errors can hold the URL or the request headers.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Protocol

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from .errors import CallError
from .retry_limits import CallLimits, Clock, RetryBudget

__all__ = ["RetryConfig", "RetryPolicy", "RetryWait", "Sleep", "is_retriable", "parse_retry_after"]

log = logging.getLogger("enricher.retry")

Sleep = Callable[[float], Awaitable[None]]
_DELTA_SECONDS = re.compile(r"-?\d+(\.\d+)?")


class RetryConfig(Protocol):
    """The fields of ``config.RetrySettings`` this module reads."""

    @property
    def attempts(self) -> int: ...
    @property
    def backoff_min(self) -> float: ...
    @property
    def backoff_max(self) -> float: ...
    @property
    def on_status(self) -> Collection[int]: ...
    @property
    def max_retry_after(self) -> float: ...
    @property
    def deadline(self) -> float: ...
    @property
    def budget(self) -> float: ...


def parse_retry_after(value: str | None, *, now: datetime, cap: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    A time in the past or a negative number gives 0, anything over ``cap`` gives ``cap``, and a
    missing or unreadable value gives None.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        seconds: float | None = float(text)
    else:
        seconds = _seconds_until_date(text, now)
    if seconds is None:
        return None
    return float(min(max(0.0, seconds), cap))


def _seconds_until_date(text: str, now: datetime) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" and asctime dates: HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return (when - now).total_seconds()


def is_retriable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: only CallErrors marked retriable."""
    return isinstance(exc, CallError) and exc.retriable


class RetryWait(wait_base):
    """The server's Retry-After when the failed attempt carries one, else full jitter.

    Every delay is within [backoff_min, backoff_max], except a Retry-After, which may be longer
    (up to ``cap``): the server's signal wins over our own backoff.
    """

    def __init__(self, *, backoff_min: float, backoff_max: float, cap: float) -> None:
        self.backoff_min = backoff_min
        self.cap = cap
        # min= keeps every delay at or over backoff_min; the first window is already
        # [min, 2 * min], so even first retries of many workers are spread out.
        self._jitter = wait_random_exponential(
            multiplier=2 * backoff_min, min=backoff_min, max=max(backoff_min, backoff_max)
        )

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        if isinstance(exc, CallError) and exc.retry_after is not None:
            seconds = exc.retry_after if math.isfinite(exc.retry_after) else self.cap
            return max(self.backoff_min, min(seconds, self.cap))
        return self._jitter(retry_state)


class RetryPolicy:
    """Stop, wait and retry rules for one API; :meth:`retrying` makes a controller per call."""

    __slots__ = ("_clock", "_retry", "api", "attempts", "budget", "deadline", "stop", "wait")

    def __init__(self, settings: RetryConfig, *, api: str, clock: Clock = time.monotonic) -> None:
        self.api = api
        self.attempts = settings.attempts
        self.deadline = settings.deadline
        self.budget = RetryBudget(settings.budget, clock=clock)
        self._clock = clock
        self.stop = stop_after_attempt(settings.attempts)
        self.wait = RetryWait(
            backoff_min=settings.backoff_min,
            backoff_max=settings.backoff_max,
            cap=settings.max_retry_after,
        )
        self._retry = retry_if_exception(is_retriable)

    def limits(self) -> CallLimits:
        """The deadline and retry budget of one call (which counts as a first attempt)."""
        return CallLimits(
            attempts=self.attempts, deadline=self.deadline, budget=self.budget, clock=self._clock
        )

    def retrying(self, sleep: Sleep, limits: CallLimits | None = None) -> AsyncRetrying:
        """A fresh controller for one call, within ``limits`` when given (else attempts only).

        Not shared between calls: tenacity keeps each run's state on the controller itself.
        ``reraise=True`` makes the last CallError itself escape, never a tenacity RetryError.
        """
        if limits is not None:
            sleep = partial(_timed_sleep, sleep, limits)
        return AsyncRetrying(
            sleep=sleep,
            stop=limits if limits is not None else self.stop,
            wait=self.wait,
            retry=self._retry,
            before_sleep=self._log_retry,
            reraise=True,
        )

    def _log_retry(self, retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        delay = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
        log.warning(
            "api %s: attempt %d of %d failed (%s, status %s); retrying in %.2fs",
            self.api,
            retry_state.attempt_number,
            self.attempts,
            getattr(exc, "kind", type(exc).__name__),
            getattr(exc, "status", None),
            delay,
        )


async def _timed_sleep(sleep: Sleep, limits: CallLimits, seconds: float) -> None:
    """A retry wait, counted against the call's deadline."""
    with limits.timing():
        await sleep(seconds)
