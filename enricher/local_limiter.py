"""In-process limiting: the shared acquire loop, the memory limiter and the local Redis fallback.

:class:`LimiterBase` owns the loop every limiter runs: ask for a decision; when granted, sleep the
reserved wait and return; when refused, sleep the hinted time (capped, so a raised quota or an
override is noticed within ``retry_cap``) and ask again. It never busy-loops, and ``close()``
cancels every pending sleep or decision so waiters raise :class:`ShuttingDown` at once.

:class:`MemoryLimiter` makes the same decisions as ``lua/acquire.lua`` (GCRA reservation, UTC
calendar quotas, run-time overrides, Retry-After blocks, replay lanes, the server's budget,
shadow limits) for one process with an injectable clock: logic tests and the dev stack use it.
:class:`LocalFallback` serves ``on_unavailable: local``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from aiolimiter import AsyncLimiter

from .lanes import Lane
from .quota import (
    PERIODS,
    ApiLimits,
    ApiUsage,
    Limits,
    ServerBudget,
    override_fields,
    period_bounds,
)
from .shutdown import ShutdownGuard
from .units import QuotaPeriod

__all__ = ["Decision", "LimiterBase", "LocalFallback", "MemoryLimiter", "gcra", "gcra_slot"]

T = TypeVar("T")
log = logging.getLogger(__name__)
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
REPLAY_ASKERS = 2  # a replay's waiters per API that ask for a slot at once (per worker)
LIVE_ASKERS = 32  # live waiters per API that ask at once (per worker; the default concurrency)
REPLAY_SPREAD_MIN = 0.01  # seconds: the least retry spread of replays refused by their own bucket
# Told when a replay's call is held because its share of a quota is spent (reason
# "replay-quota:<period>") and when it goes on again (reason None).
ReplayHoldHook = Callable[[str, Lane, str | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer: granted (sleep ``wait`` seconds, then call) or refused (ask after ``wait``).

    ``reason`` of a refusal: ``blocked``, ``server`` (the server's own budget is spent),
    ``quota:<period>``, ``rate``, ``redis`` (unreachable), and for a replay's call
    ``replay-quota:<period>`` (its share is used) or ``replay-rate``. ``remaining`` is each
    quota's remainder after the decision; ``rate`` the effective calls/s; ``grant`` the number
    of a granted call (None if not counted), handed back with the server's figures.
    """

    granted: bool
    wait: float
    reason: str = ""
    remaining: Mapping[QuotaPeriod, int] = field(default_factory=dict)
    rate: float | None = None
    grant: int | None = None


def gcra(tat: float, now: float, rate: float, burst: int) -> tuple[float, float]:
    """GCRA reservation: ``(wait, new_tat)`` for one more call; times in seconds."""
    interval = 1.0 / rate
    new_tat = max(tat, now) + interval
    return max(0.0, new_tat - burst * interval - now), new_tat


def gcra_slot(tat: float, now: float, rate: float, burst: int) -> float:
    """The earliest moment one more call conforms to a GCRA bucket (seconds); after a call at
    ``slot`` the bucket's TAT becomes ``max(tat, slot) + 1 / rate``."""
    return max(now, tat - (burst - 1) / rate)


class LimiterBase:
    """The acquire loop and prompt shutdown; subclasses provide ``_decide`` and ``_check``."""

    def __init__(self, *, max_wait: float, retry_cap: float, sleep: Sleep) -> None:
        self._max_wait = max_wait
        self._retry_cap = retry_cap
        self._sleep = sleep
        self._guard = ShutdownGuard("limiter")
        self.on_replay_hold: ReplayHoldHook | None = None
        self._gates: dict[tuple[str, str | None], asyncio.Semaphore] = {}

    async def acquire(
        self, api: str, lane: Lane | None = None, seat: asyncio.Semaphore | None = None
    ) -> int | None:
        """Wait until one call to ``api`` may start; raises ShuttingDown once closed. Returns the
        grant's number (None if not counted).

        ``lane`` is a replay's lane (``None``: a live call); see ``lua/acquire.lua``. ``seat``
        (the API's concurrency slots) is held once granted, and then it is the caller's to
        release after the call. A replay's call takes it for each decision and gives it back
        after a refusal, so a replay waiting for tokens at its share's pace never holds seats
        that other calls could use. A live call takes it first and keeps it while it waits:
        a refusal refuses every call of the API alike, and every call must wait for a seat
        anyway, so it waits once (for the seat) instead of twice (for the askers' gate, then
        for the seat)."""
        self._check(api)
        # Only a few waiters per API (and per replay) ask at a time; the rest queue here, in
        # order. A replay's waiters are refused, not given reservations, past the shared
        # bucket's horizon (acquire.lua), so a replay costs about one decision per call instead
        # of one per retry; and refused live waiters do not all retry.
        key = (api, None if lane is None else lane.replay_id)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = asyncio.Semaphore(
                LIVE_ASKERS if lane is None else REPLAY_ASKERS
            )
        held = seat if lane is None else None  # the seat we hold: a live call's from the start
        if held is not None:
            await held.acquire()
        try:
            async with gate:  # a replay's call takes (and keeps) its seat with the grant
                decision, was_held = await self._until_granted(
                    api, lane, None if held is not None else seat
                )
            # the seat is ours until the caller's call: give it back if we never get there
            held = seat
            if lane is not None and was_held:
                await self._tell_hold(api, lane, None)
            if decision.wait > 0:
                await self._guard.run(self._sleep(decision.wait))
        except BaseException:
            if held is not None:
                held.release()
            raise
        return decision.grant

    async def _until_granted(
        self, api: str, lane: Lane | None, seat: asyncio.Semaphore | None
    ) -> tuple[Decision, bool]:
        """Ask until a decision grants a slot (sleeping between refusals); ``seat`` is held
        on return. Also returns whether the replay's quota share held it meanwhile (then told
        to the hold hook, as its end is once the call goes on)."""
        held = False
        while True:
            decision = await self._ask_seated(api, lane, seat)
            if decision.granted:
                return decision, held
            if lane is not None and held != decision.reason.startswith("replay-quota"):
                held = not held
                await self._tell_hold(api, lane, decision.reason if held else None)
            await self._guard.run(self._sleep(self._retry_delay(decision)))

    async def _ask_seated(
        self, api: str, lane: Lane | None, seat: asyncio.Semaphore | None
    ) -> Decision:
        """One decision with ``seat`` taken for it: kept if granted, given back otherwise.

        The decision is not run as a guarded task like the waits (a task per decision cost a
        busy worker a few percent of its CPU): it is short (Redis calls time out, and closing
        the Redis limiter fails its queued and sent decisions at once), and a close meanwhile
        is caught as soon as it returns."""
        if seat is not None:
            await seat.acquire()
        try:
            self._guard.check()
            decision = await self._decide(api, lane)
            self._guard.check()
        except BaseException:
            if seat is not None:
                seat.release()
            raise
        if not decision.granted and seat is not None:
            seat.release()
        return decision

    async def _tell_hold(self, api: str, lane: Lane, reason: str | None) -> None:
        if self.on_replay_hold is None:
            return
        try:
            await self.on_replay_hold(api, lane, reason)
        except Exception as exc:  # a status figure: never fail the call for it
            log.warning("replay hold hook failed: %s", type(exc).__name__)

    async def close(self) -> None:
        """Make every pending and future ``acquire`` raise ShuttingDown."""
        self._guard.close()

    async def _decide(self, api: str, lane: Lane | None) -> Decision:
        raise NotImplementedError

    def _check(self, api: str) -> None:
        raise NotImplementedError

    def _retry_delay(self, decision: Decision) -> float:
        # Refused callers spread their retries (jitter) so they do not all ask at the same instant.
        if decision.reason == "replay-rate":
            # A replay's own bucket frees its next slot in ``wait``: spread over about that long,
            # so the first of many waiters comes back soon after it (the lane keeps its pace).
            spread = min(max(decision.wait, REPLAY_SPREAD_MIN), self._max_wait / 2)
        else:
            spread = self._max_wait / 2 if decision.reason == "rate" else 0.05
        return min(decision.wait + random.uniform(0, spread), self._retry_cap)


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
        # replays, by (api, replay id): own TAT, and per period (stamp, cap) and (stamp, used)
        self._replay_tat: dict[tuple[str, str], float] = {}
        self._replay_cap: dict[tuple[str, str, QuotaPeriod], tuple[str, int]] = {}
        self._replay_used: dict[tuple[str, str, QuotaPeriod], tuple[str, int]] = {}
        self._granted: dict[str, int] = defaultdict(int)  # grant numbers
        self._budget: dict[str, tuple[int, float]] = {}  # the server's (limit, reset at)
        self._shadow: dict[str, tuple[float, int, int]] = {}  # shadow (tat, delayed, calls)

    def _check(self, api: str) -> None:
        if api not in self._apis:
            raise ValueError(f"unknown API {api!r}")

    async def _decide(self, api: str, lane: Lane | None) -> Decision:
        return self.decide(api, lane)

    def decide(self, api: str, lane: Lane | None = None) -> Decision:
        """One decision now, reserving when granted (the same steps as ``acquire.lua``)."""
        now = self._clock()
        limits, server = self._effective(api, now)
        used = {p: self._count(api, p, now) for p in limits.quotas}
        remaining = {p: max(0, n - used[p]) for p, n in limits.quotas.items()}
        if (blocked := self._blocked.get(api, 0.0)) > now:
            return Decision(False, blocked - now, "blocked", remaining, limits.rate)
        if server is not None and server[0] <= 0:
            return Decision(False, server[1] - now, "server", remaining, limits.rate)
        for period in (p for p in PERIODS if p in limits.quotas):
            if used[period] >= limits.quotas[period]:
                end = period_bounds(period, now)[1]
                return Decision(False, end - now, f"quota:{period}", remaining, limits.rate)
        caps: dict[QuotaPeriod, int] = {}
        if lane is not None:
            for period in (p for p in PERIODS if p in limits.quotas):
                _, end, stamp = period_bounds(period, now)
                held = self._replay_cap.get((api, lane.replay_id, period))
                cap = held[1] if held and held[0] == stamp else None
                caps[period] = math.floor(lane.share * remaining[period]) if cap is None else cap
                if self._replay_count(api, lane.replay_id, period, now) >= caps[period]:
                    reason = f"replay-quota:{period}"
                    return Decision(False, end - now, reason, remaining, limits.rate)
        tat = self._tat.get(api, 0.0)
        slot = gcra_slot(tat, now, limits.rate, limits.burst)
        if lane is not None:  # never past the shared TAT: see the header of lua/acquire.lua
            replay_rate, replay_burst = limits.replay_bucket(lane.share)
            replay_tat = self._replay_tat.get((api, lane.replay_id), 0.0)
            replay_slot = gcra_slot(replay_tat, now, replay_rate, replay_burst)
            if replay_slot > (horizon := max(now, tat)):
                return Decision(False, replay_slot - horizon, "replay-rate", remaining, limits.rate)
            slot = max(slot, replay_slot)
        wait = slot - now
        if wait > self._max_wait:
            return Decision(False, wait - self._max_wait, "rate", remaining, limits.rate)
        self._tat[api] = max(tat, slot) + 1 / limits.rate
        if lane is not None:
            self._replay_tat[api, lane.replay_id] = max(replay_tat, slot) + 1 / replay_rate
        for period in limits.quotas:
            stamp = period_bounds(period, now)[2]
            self._used[api, period] = (stamp, used[period] + 1)
            remaining[period] = max(0, remaining[period] - 1)
            if lane is not None:
                key = (api, lane.replay_id, period)
                self._replay_cap[key] = (stamp, caps[period])
                count = self._replay_count(api, lane.replay_id, period, now)
                self._replay_used[key] = (stamp, count + 1)
        self._granted[api] += 1
        self._measure_shadow(api, slot)
        return Decision(True, wait, "", remaining, limits.rate, self._granted[api])

    def _effective(self, api: str, now: float) -> tuple[Limits, tuple[int, float] | None]:
        """Config and overrides, paced by the server's budget when slower (burst 1); and that
        budget's (calls left, reset at), as in acquire.lua."""
        limits = Limits.of(self._apis[api]).overridden(self._overrides[api])
        limit, reset_at = self._budget.get(api, (0, 0.0))
        if reset_at <= now:
            return limits, None
        left = limit - self._granted[api]
        if left > 0 and (pace := left / (reset_at - now)) < limits.rate:
            limits = replace(limits, rate=pace, burst=1)
        return limits, (left, reset_at)

    def _measure_shadow(self, api: str, slot: float) -> None:
        """The shadow limit at the call's slot: a GCRA policer, never enforced (acquire.lua)."""
        overrides = self._overrides[api]
        if "shadow_rate" not in overrides:
            return
        rate, burst = float(overrides["shadow_rate"]), int(overrides.get("shadow_burst", "1"))
        tat, delayed, calls = self._shadow.get(api, (0.0, 0, 0))
        if tat - (burst - 1) / rate > slot:
            delayed += 1
        else:
            tat = max(tat, slot) + 1 / rate
        self._shadow[api] = (tat, delayed, calls + 1)

    def _count(self, api: str, period: QuotaPeriod, now: float) -> int:
        stamp, count = self._used.get((api, period), ("", 0))
        return count if stamp == period_bounds(period, now)[2] else 0

    def _replay_count(self, api: str, replay_id: str, period: QuotaPeriod, now: float) -> int:
        stamp, count = self._replay_used.get((api, replay_id, period), ("", 0))
        return count if stamp == period_bounds(period, now)[2] else 0

    async def replay_usage(
        self, api: str, replay_id: str
    ) -> dict[QuotaPeriod, dict[str, int | None]]:
        """A replay's ``{period: {"cap": ..., "used": ...}}`` in the current periods."""
        self._check(api)
        now = self._clock()
        usage: dict[QuotaPeriod, dict[str, int | None]] = {}
        for period in PERIODS:
            held = self._replay_cap.get((api, replay_id, period))
            if held and held[0] == period_bounds(period, now)[2]:
                usage[period] = {
                    "cap": held[1],
                    "used": self._replay_count(api, replay_id, period, now),
                }
        return usage

    async def block(self, api: str, seconds: float) -> None:
        """Refuse calls to ``api`` for ``seconds`` (never shortens a longer block)."""
        self._check(api)
        until = self._clock() + max(0.0, seconds)
        self._blocked[api] = max(self._blocked.get(api, 0.0), until)

    async def server_signal(
        self, api: str, remaining: int, reset: float, grant: int | None = None
    ) -> None:
        """After grant number ``grant`` (None: the last one), the server has ``remaining`` calls
        left for ``reset`` seconds; a tighter budget than the one known for its window replaces
        it (``lua/server_budget.lua``). None left also blocks ``api`` until the reset."""
        self._check(api)
        if reset <= 0:
            return
        if remaining <= 0:
            await self.block(api, reset)
        now = self._clock()
        limit = (self._granted[api] if grant is None else grant) + max(0, remaining)
        known_limit, known_reset = self._budget.get(api, (0, 0.0))
        if known_reset <= now or limit < known_limit:
            self._budget[api] = (limit, now + reset)

    async def set_overrides(
        self,
        api: str,
        *,
        rate: float | None = None,
        burst: int | None = None,
        quotas: Mapping[str, int | None] | None = None,
        shadow_rate: float | None = None,
        shadow_burst: int | None = None,
    ) -> None:
        """Override ``api``'s rate (calls/s), burst or quotas (``None`` removes a quota), or set
        a shadow limit (a new one starts a new count)."""
        self._check(api)
        fields = override_fields(
            rate=rate,
            burst=burst,
            quotas=quotas,
            shadow_rate=shadow_rate,
            shadow_burst=shadow_burst,
        )
        self._overrides[api].update(fields)
        if "shadow_rate" in fields:
            self._shadow.pop(api, None)

    async def reset_overrides(self, api: str, *, reset_usage: bool = False) -> None:
        """Drop the overrides (and the shadow count), and with ``reset_usage`` the current
        periods' counters."""
        self._check(api)
        self._overrides.pop(api, None)
        self._shadow.pop(api, None)
        if reset_usage:
            for period in PERIODS:
                self._used.pop((api, period), None)

    async def usage(self, api: str) -> ApiUsage:
        """Effective limits and current usage of ``api``."""
        self._check(api)
        now = self._clock()
        used = {p: self._count(api, p, now) for p in PERIODS}
        blocked = self._blocked.get(api, 0.0)
        _, delayed, calls = self._shadow.get(api, (0.0, 0, 0))
        limit, reset_at = self._budget.get(api, (0, 0.0))
        server = ServerBudget.of(limit, reset_at, self._granted[api], now)
        return ApiUsage.build(
            self._apis[api],
            self._overrides[api],
            used,
            blocked,
            now,
            shadow=(delayed, calls),
            server=server,
        )


class LocalFallback:
    """Per-worker limits while Redis is unreachable (``on_unavailable: local``).

    Rate: an ``aiolimiter.AsyncLimiter`` at ``rate x share`` calls/s (the last effective rate seen
    from Redis, else the configured one) holding at most ``max(1, burst x share)`` calls.
    Quotas: in the period last seen from Redis, at most ``share`` of what was then remaining; in a
    new period, ``share`` of the configured limit. Calls made here are counted per period so the
    Redis limiter can add them to the shared counters when Redis is back (best effort).

    A replay's call (``lane``) takes from those and from its own lane: a bucket of ``rate x share x
    lane.share`` calls/s, and per period at most ``lane.share`` of the local quota allowance
    (none at all in a period where Redis said the replay had used its share).
    """

    def __init__(self, apis: Mapping[str, ApiLimits], share: float, clock: Clock) -> None:
        self._limits = {name: Limits.of(api) for name, api in apis.items()}
        self._share = share
        self._clock = clock
        self._seen: dict[str, dict[QuotaPeriod, tuple[str, int]]] = {}
        self._rates: dict[str, float] = {}
        # by (api, replay id or None for the shared bucket): (rate, bucket)
        self._buckets: dict[tuple[str, str | None], tuple[float, AsyncLimiter]] = {}
        self._counts: dict[tuple[str, QuotaPeriod, str], int] = defaultdict(int)
        self._replay_counts: dict[tuple[str, str, QuotaPeriod, str], int] = defaultdict(int)
        self._replay_spent: set[tuple[str, str, QuotaPeriod, str]] = set()

    def observe(self, api: str, decision: Decision, now: float, lane: Lane | None = None) -> None:
        """Remember what Redis said (quota remaining, effective rate, a replay's spent share)
        for a later outage.

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
        if lane is not None and decision.reason.startswith("replay-quota:"):
            period = next(p for p in PERIODS if decision.reason == f"replay-quota:{p}")
            self._replay_spent.add((api, lane.replay_id, period, period_bounds(period, now)[2]))

    async def decide(self, api: str, lane: Lane | None = None) -> Decision:
        """Take one local token and one unit of each local quota allowance (and of the lane's)."""
        now = self._clock()
        stamps: list[tuple[QuotaPeriod, str]] = []
        for period, base in self._quota_bases(api, now):
            _, end, stamp = period_bounds(period, now)
            allowance = math.floor(base * self._share)
            if self._counts[api, period, stamp] >= allowance:
                return Decision(False, end - now, f"quota:{period}")
            if lane is not None:
                key = (api, lane.replay_id, period, stamp)
                lane_allowance = math.floor(base * self._share * lane.share)
                if key in self._replay_spent or self._replay_counts[key] >= lane_allowance:
                    return Decision(False, end - now, f"replay-quota:{period}")
            stamps.append((period, stamp))
        for period, stamp in stamps:  # counted before waiting: a cancelled wait overcounts
            self._counts[api, period, stamp] += 1
            if lane is not None:
                self._replay_counts[api, lane.replay_id, period, stamp] += 1
        if lane is not None:
            await self._bucket(api, lane).acquire()
        await self._bucket(api, None).acquire()
        return Decision(True, 0.0)

    def take_counts(self) -> dict[tuple[str, QuotaPeriod, str], int]:
        """The calls made locally per ``(api, period, stamp)`` since the last take."""
        counts, self._counts = dict(self._counts), defaultdict(int)
        return counts

    def take_replay_counts(self) -> dict[tuple[str, str, QuotaPeriod, str], int]:
        """Replays' calls made locally per ``(api, replay id, period, stamp)`` (also counted in
        :meth:`take_counts`) since the last take."""
        counts, self._replay_counts = dict(self._replay_counts), defaultdict(int)
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

    def _bucket(self, api: str, lane: Lane | None) -> AsyncLimiter:
        """The API's local bucket, or (``lane`` given) that replay's own local bucket."""
        share = self._share * (lane.share if lane is not None else 1.0)
        rate = self._rates.get(api, self._limits[api].rate) * share
        key = (api, lane.replay_id if lane is not None else None)
        known = self._buckets.get(key)
        if known is None or known[0] != rate:
            size = max(1.0, self._limits[api].burst * share)
            known = (rate, AsyncLimiter(size, size / rate))
            self._buckets[key] = known
        return known[1]
