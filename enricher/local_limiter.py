"""In-process limiting: the shared acquire loop, the memory limiter and the local Redis fallback.

:class:`LimiterBase` owns the loop every limiter runs: ask for a decision; when granted, sleep the
reserved wait and return; when refused, sleep the hinted time (capped, so a raised quota or an
override is noticed within ``retry_cap``) and ask again. It never busy-loops, and ``close()``
cancels every pending sleep or decision so waiters raise :class:`ShuttingDown` at once.

:class:`MemoryLimiter` makes the same decisions as ``lua/acquire.lua`` (GCRA reservation, UTC
calendar quotas, run-time overrides, Retry-After blocks) for one process with an injectable clock:
logic tests and the dev stack use it. :class:`LocalFallback` serves ``on_unavailable: local``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiolimiter import AsyncLimiter

from .errors import ShuttingDown
from .quota import PERIODS, ApiLimits, ApiUsage, Limits, override_fields, period_bounds
from .units import QuotaPeriod

__all__ = ["Decision", "LimiterBase", "LocalFallback", "MemoryLimiter", "gcra"]

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer: granted (sleep ``wait`` seconds, then call) or refused (ask after ``wait``).

    ``reason`` of a refusal: ``blocked``, ``quota:<period>``, ``rate`` or ``redis`` (unreachable).
    ``remaining`` is each quota's remainder after the decision; ``rate`` the effective calls/s.
    """

    granted: bool
    wait: float
    reason: str = ""
    remaining: Mapping[QuotaPeriod, int] = field(default_factory=dict)
    rate: float | None = None


def gcra(tat: float, now: float, rate: float, burst: int) -> tuple[float, float]:
    """GCRA reservation: ``(wait, new_tat)`` for one more call; times in seconds."""
    interval = 1.0 / rate
    new_tat = max(tat, now) + interval
    return max(0.0, new_tat - burst * interval - now), new_tat


class LimiterBase:
    """The acquire loop and prompt shutdown; subclasses provide ``_decide`` and ``_check``."""

    def __init__(self, *, max_wait: float, retry_cap: float, sleep: Sleep) -> None:
        self._max_wait = max_wait
        self._retry_cap = retry_cap
        self._sleep = sleep
        self._closed = False
        self._pending: set[asyncio.Future[Any]] = set()

    async def acquire(self, api: str) -> None:
        """Wait until one call to ``api`` may start; raises ShuttingDown once closed."""
        self._check(api)
        while True:
            decision = await self._guarded(self._decide(api))
            if decision.granted:
                if decision.wait > 0:
                    await self._guarded(self._sleep(decision.wait))
                return
            await self._guarded(self._sleep(self._retry_delay(decision)))

    async def close(self) -> None:
        """Make every pending and future ``acquire`` raise ShuttingDown."""
        self._closed = True
        for future in list(self._pending):
            future.cancel()

    async def _decide(self, api: str) -> Decision:
        raise NotImplementedError

    def _check(self, api: str) -> None:
        raise NotImplementedError

    def _retry_delay(self, decision: Decision) -> float:
        # Refused callers spread their retries (jitter) so they do not all ask at the same instant.
        spread = self._max_wait / 2 if decision.reason == "rate" else 0.05
        return min(decision.wait + random.uniform(0, spread), self._retry_cap)

    async def _guarded(self, step: Awaitable[T]) -> T:
        """Run ``step`` as a task that ``close()`` can cancel, turning that into ShuttingDown."""
        if self._closed:
            if inspect.iscoroutine(step):
                step.close()
            raise ShuttingDown("the limiter is closed")
        task = asyncio.ensure_future(step)
        self._pending.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Our own task being cancelled is not a shutdown: let that propagate unchanged.
            if not self._closed or (current is not None and current.cancelling()):
                raise
            raise ShuttingDown("the limiter was closed while waiting") from None
        finally:
            self._pending.discard(task)


class MemoryLimiter(LimiterBase):
    """Single-process limiter with the same semantics as the Redis one (tests, dev stack)."""

    def __init__(
        self,
        *,
        apis: Mapping[str, ApiLimits],
        max_wait: float = 1.0,
        retry_cap: float = 1.0,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(max_wait=max_wait, retry_cap=retry_cap, sleep=sleep)
        self._apis = dict(apis)
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._blocked: dict[str, float] = {}
        self._overrides: dict[str, dict[str, str]] = defaultdict(dict)
        self._used: dict[tuple[str, QuotaPeriod], tuple[str, int]] = {}

    def _check(self, api: str) -> None:
        if api not in self._apis:
            raise ValueError(f"unknown API {api!r}")

    async def _decide(self, api: str) -> Decision:
        return self.decide(api)

    def decide(self, api: str) -> Decision:
        """One decision now, reserving when granted (the same steps as ``acquire.lua``)."""
        now = self._clock()
        limits = Limits.of(self._apis[api]).overridden(self._overrides[api])
        used = {p: self._count(api, p, now) for p in limits.quotas}
        remaining = {p: max(0, n - used[p]) for p, n in limits.quotas.items()}
        if (blocked := self._blocked.get(api, 0.0)) > now:
            return Decision(False, blocked - now, "blocked", remaining, limits.rate)
        for period in (p for p in PERIODS if p in limits.quotas):
            if used[period] >= limits.quotas[period]:
                end = period_bounds(period, now)[1]
                return Decision(False, end - now, f"quota:{period}", remaining, limits.rate)
        wait, new_tat = gcra(self._tat.get(api, 0.0), now, limits.rate, limits.burst)
        if wait > self._max_wait:
            return Decision(False, wait - self._max_wait, "rate", remaining, limits.rate)
        self._tat[api] = new_tat
        for period in limits.quotas:
            self._used[api, period] = (period_bounds(period, now)[2], used[period] + 1)
            remaining[period] = max(0, remaining[period] - 1)
        return Decision(True, wait, "", remaining, limits.rate)

    def _count(self, api: str, period: QuotaPeriod, now: float) -> int:
        stamp, count = self._used.get((api, period), ("", 0))
        return count if stamp == period_bounds(period, now)[2] else 0

    async def block(self, api: str, seconds: float) -> None:
        """Refuse calls to ``api`` for ``seconds`` (never shortens a longer block)."""
        self._check(api)
        until = self._clock() + max(0.0, seconds)
        self._blocked[api] = max(self._blocked.get(api, 0.0), until)

    async def set_overrides(
        self,
        api: str,
        *,
        rate: float | None = None,
        burst: int | None = None,
        quotas: Mapping[str, int | None] | None = None,
    ) -> None:
        """Override ``api``'s rate (calls/s), burst or quotas (``None`` removes a quota)."""
        self._check(api)
        self._overrides[api].update(override_fields(rate=rate, burst=burst, quotas=quotas))

    async def reset_overrides(self, api: str, *, reset_usage: bool = False) -> None:
        """Drop the overrides, and with ``reset_usage`` the current periods' counters."""
        self._check(api)
        self._overrides.pop(api, None)
        if reset_usage:
            for period in PERIODS:
                self._used.pop((api, period), None)

    async def usage(self, api: str) -> ApiUsage:
        """Effective limits and current usage of ``api``."""
        self._check(api)
        now = self._clock()
        used = {p: self._count(api, p, now) for p in PERIODS}
        blocked = self._blocked.get(api, 0.0)
        return ApiUsage.build(self._apis[api], self._overrides[api], used, blocked, now)


class LocalFallback:
    """Per-worker limits while Redis is unreachable (``on_unavailable: local``).

    Rate: an ``aiolimiter.AsyncLimiter`` at ``rate x share`` calls/s (the last effective rate seen
    from Redis, else the configured one) holding at most ``max(1, burst x share)`` calls.
    Quotas: in the period last seen from Redis, at most ``share`` of what was then remaining; in a
    new period, ``share`` of the configured limit. Calls made here are counted per period so the
    Redis limiter can add them to the shared counters when Redis is back (best effort).
    """

    def __init__(self, apis: Mapping[str, ApiLimits], share: float, clock: Clock) -> None:
        self._limits = {name: Limits.of(api) for name, api in apis.items()}
        self._share = share
        self._clock = clock
        self._seen: dict[str, dict[QuotaPeriod, tuple[str, int]]] = {}
        self._rates: dict[str, float] = {}
        self._buckets: dict[str, tuple[float, AsyncLimiter]] = {}
        self._counts: dict[tuple[str, QuotaPeriod, str], int] = defaultdict(int)

    def observe(self, api: str, decision: Decision, now: float) -> None:
        """Remember what Redis said (quota remaining, effective rate) for a later outage.

        Replies to concurrent calls arrive in any order, so within one period the smallest
        remainder seen is kept (conservative: an outage never spends more than was left).
        """
        before = self._seen.get(api, {})
        seen: dict[QuotaPeriod, tuple[str, int]] = {}
        for period, left in decision.remaining.items():
            stamp = period_bounds(period, now)[2]
            last = before.get(period)
            seen[period] = (stamp, min(left, last[1]) if last and last[0] == stamp else left)
        self._seen[api] = seen
        if decision.rate is not None:
            self._rates[api] = decision.rate

    async def decide(self, api: str) -> Decision:
        """Take one local token and one unit of each local quota allowance."""
        now = self._clock()
        stamps: list[tuple[QuotaPeriod, str]] = []
        for period, base in self._quota_bases(api, now):
            _, end, stamp = period_bounds(period, now)
            if self._counts[api, period, stamp] >= math.floor(base * self._share):
                return Decision(False, end - now, f"quota:{period}")
            stamps.append((period, stamp))
        for period, stamp in stamps:  # counted before waiting: a cancelled wait overcounts
            self._counts[api, period, stamp] += 1
        await self._bucket(api).acquire()
        return Decision(True, 0.0)

    def take_counts(self) -> dict[tuple[str, QuotaPeriod, str], int]:
        """The calls made locally per ``(api, period, stamp)`` since the last take."""
        counts, self._counts = dict(self._counts), defaultdict(int)
        return counts

    def _quota_bases(self, api: str, now: float) -> list[tuple[QuotaPeriod, int]]:
        configured, seen = self._limits[api].quotas, self._seen.get(api)
        bases: list[tuple[QuotaPeriod, int]] = []
        for period in seen if seen is not None else configured:
            last = seen.get(period) if seen is not None else None
            if last is not None and last[0] == period_bounds(period, now)[2]:
                bases.append((period, last[1]))
            else:
                bases.append((period, configured.get(period, last[1] if last else 0)))
        return bases

    def _bucket(self, api: str) -> AsyncLimiter:
        rate = self._rates.get(api, self._limits[api].rate) * self._share
        known = self._buckets.get(api)
        if known is None or known[0] != rate:
            size = max(1.0, self._limits[api].burst * self._share)
            known = (rate, AsyncLimiter(size, size / rate))
            self._buckets[api] = known
        return known[1]
