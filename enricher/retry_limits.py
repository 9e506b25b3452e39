"""Bounds on retries beyond ``attempts``: a per-event deadline and a per-worker retry budget.

    Deadline      the time one event's call to an API has spent in HTTP requests and in retry
                  waits (backoff, Retry-After). Limiter, quota and circuit-breaker holds are not
                  counted: holding an event there is intentional, and it costs the API nothing.
                  A retry whose wait would end past ``deadline`` is not made.
    RetryBudget   retries this worker may make to one API: ``ratio`` of its first attempts over a
                  sliding window (10 s), plus a floor of a few retries per second so a trickle of
                  events still retries (the gRPC / Finagle retry budget). Retries the server
                  paced with ``Retry-After`` are exempt (see :meth:`CallLimits.__call__`).
                  Kept per worker process: each worker sees its own share of the traffic, so
                  its own ratio bounds the sum (the floor adds a few retries a second per
                  worker), and a decision costs no Redis round trip while the API is failing.
    CallLimits    both, for one call: the tenacity ``stop`` of that call, which remembers why it
                  stopped so the dead letter can say so.

Time comes from an injectable clock (``time.monotonic``), so tests step it instead of sleeping.
The caller marks what counts against the deadline with a :func:`timing` block: the request
itself; the retry waits are timed by the sleep the policy hands to tenacity.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from types import TracebackType
from typing import Literal

from tenacity import RetryCallState

from .errors import CallError

__all__ = ["BUDGET_WINDOW", "CallLimits", "Clock", "RetryBudget", "StopReason", "timing"]

Clock = Callable[[], float]
StopReason = Literal["deadline", "budget"]

BUDGET_WINDOW = 10.0  # seconds of first attempts and retries the budget looks at
MIN_RETRIES_PER_SECOND = 3.0  # the budget's floor: what a trickle of events may always retry
_SLOTS = 10  # the window is kept as this many slots: it slides by a tenth of itself

_MESSAGES: dict[StopReason, str] = {
    "deadline": "deadline exceeded",
    "budget": "retry budget exhausted",
}

# The limits of the call running in this task: the caller times its requests against them.
_CURRENT: ContextVar[CallLimits | None] = ContextVar("enricher_call_limits", default=None)


class RetryBudget:
    """Retries allowed to one API in this worker: ``ratio`` x first attempts + a floor, per window.

    Only retries actually granted are counted, so a denied retry does not use up budget.
    """

    __slots__ = ("_clock", "_slot_seconds", "_slots", "floor", "ratio")

    def __init__(
        self,
        ratio: float,
        *,
        window: float = BUDGET_WINDOW,
        min_per_second: float = MIN_RETRIES_PER_SECOND,
        clock: Clock = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.floor = min_per_second * window
        self._clock = clock
        self._slot_seconds = window / _SLOTS
        self._slots: deque[list[int]] = deque()  # [slot number, first attempts, retries]

    def record_call(self) -> None:
        """A call's first attempt: it earns ``ratio`` of a retry."""
        self._slot()[1] += 1

    def try_retry(self) -> bool:
        """Take one retry if the window has room for it."""
        slot = self._slot()
        calls = sum(s[1] for s in self._slots)
        retries = sum(s[2] for s in self._slots)
        if retries + 1 > self.ratio * calls + self.floor:
            return False
        slot[2] += 1
        return True

    def _slot(self) -> list[int]:
        """The current slot, after dropping those that left the window."""
        number = int(self._clock() // self._slot_seconds)
        slots = self._slots
        while slots and slots[0][0] <= number - _SLOTS:
            slots.popleft()
        if not slots or slots[-1][0] != number:
            slots.append([number, 0, 0])
        return slots[-1]


class CallLimits:
    """One call's deadline and the worker's retry budget, as a tenacity ``stop``.

    ``spent`` is what the call has used of ``deadline``; ``stopped_by`` says which limit ended the
    retries (None: the attempts ran out, or nothing stopped them).
    """

    __slots__ = ("_budget", "_clock", "attempts", "deadline", "spent", "stopped_by")

    def __init__(
        self, *, attempts: int, deadline: float, budget: RetryBudget, clock: Clock = time.monotonic
    ) -> None:
        self.attempts = attempts
        self.deadline = deadline
        self.spent = 0.0
        self.stopped_by: StopReason | None = None
        self._budget = budget
        self._clock = clock
        budget.record_call()

    def __call__(self, retry_state: RetryCallState) -> bool:
        """Whether to stop instead of retrying after ``retry_state``'s failed attempt.

        Tenacity computes the wait first, so ``upcoming_sleep`` is the wait this retry needs.
        The budget is asked last: a retry that the other limits refuse takes nothing from it.
        A retry after a ``Retry-After`` does not use the budget: the wait is the server's own
        and already pauses the API for every worker, so it adds no load the server did not ask
        for (the deadline still applies).
        """
        if retry_state.attempt_number >= self.attempts:
            return True
        if self.spent + retry_state.upcoming_sleep > self.deadline:
            self.stopped_by = "deadline"
        elif not _paced_by_server(retry_state) and not self._budget.try_retry():
            self.stopped_by = "budget"
        return self.stopped_by is not None

    def timing(self) -> _Timing:
        """A block whose time counts against the deadline (a plain ``with``: wrapping the
        request in another coroutine would cost every resumption of it one more frame)."""
        return _Timing(self)

    @contextmanager
    def active(self) -> Iterator[CallLimits]:
        """Make these the limits :func:`timing` counts against, in this task, for the block."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def explain(self, error: CallError) -> None:
        """Say in ``error`` (the last attempt's) why no further attempt was made, if a limit
        stopped the retries."""
        if self.stopped_by is None:
            return
        reason = _MESSAGES[self.stopped_by]
        if self.stopped_by == "deadline":
            reason += f" ({self.deadline:g}s)"
        error.message = f"{error.message}; no retry: {reason}"
        error.args = (error.message,)
        error.retry_stopped = self.stopped_by


class _Timing:
    """Adds the time spent in its block to ``limits.spent``."""

    __slots__ = ("_limits", "_started")

    def __init__(self, limits: CallLimits) -> None:
        self._limits = limits
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = self._limits._clock()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._limits.spent += self._limits._clock() - self._started


def timing() -> AbstractContextManager[None]:
    """A block whose time counts against the current call's deadline, if any."""
    limits = _CURRENT.get()
    return nullcontext() if limits is None else limits.timing()


def _paced_by_server(retry_state: RetryCallState) -> bool:
    """Whether the failed attempt carries the server's ``Retry-After``."""
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    return isinstance(error, CallError) and error.retry_after is not None
