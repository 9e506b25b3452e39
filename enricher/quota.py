"""Limits, quota periods and the Redis key layout shared by every limiter, plus ``limits`` admin.

Key layout (``<prefix>`` is ``enricher:{<app_id>:<api>}:``; the ``{...}`` hash tag puts every key
of one API in one Redis Cluster slot, so one script can touch them all atomically):

    key                               value                           TTL
    <prefix>tat                       GCRA theoretical arrival, µs    until the bucket is full + 1 s
    <prefix>blocked                   "blocked until" (Retry-After)   until the block ends + 1 s
    <prefix>overrides                 hash: rate, burst, quota:<p>    30 days, renewed by limits set
    <prefix>quota:<period>:<stamp>    calls granted in that period    until the period ends + 60 s
    <prefix>quota:<p>:<s>:base        the counter at epoch start      as the counter
    <prefix>quota:epoch               the current epoch (µs)          7 days, renewed per decision
    <prefix>server_budget             hash: limit, reset_at (µs)      until the server's reset
    <prefix>granted                   number of the last grant        32 days, renewed per grant
    <prefix>shadow:tat                shadow GCRA TAT, µs             until the bucket is full + 1 s
    <prefix>shadow:delayed            calls the shadow would delay    as the overrides hash
    <prefix>shadow:calls              calls the shadow saw            as the overrides hash
    <prefix>circuit:open              open circuit: cool-down end µs  cool-down + 10 min
    <prefix>circuit:failures          consecutive failed attempts     10 min, renewed per failure
    <prefix>circuit:probe             the probe's lease (a token)     the API's timeout + 5 s
    <prefix>replay:<id>:tat           a replay's own GCRA TAT, µs     until the bucket is full + 1 s
    <prefix>replay:<id>:cap:<p>:<s>   units the replay may use there  until the period ends + 60 s
    <prefix>replay:<id>:used:<p>:<s>  units the replay used there     until the period ends + 60 s

The overrides hash may also hold ``shadow_rate`` and ``shadow_burst`` (``limits set
--shadow-rate``): a limit evaluated at every granted call but never enforced (``lua/acquire.lua``).

The epoch and the bases recover from lost state (Redis restarted empty, flushed or rolled
back): each worker hands back the ``sight`` of the last reply it got (:func:`newer_sight`), and a
new epoch fails closed (``lua/acquire.lua``, "Recovery from lost state").

A replay's cap is ``floor(share x remaining)`` at its first granted call in the period (SET NX);
its calls also count in the shared ``quota`` counters and take slots of the shared bucket.

Quota periods are UTC calendar periods; stamps read ``2025-01-31T12:34`` (minute),
``2025-01-31T12`` (hour), ``2025-01-31`` (day) and ``2025-01`` (month). The Lua scripts compute
the same periods from Redis time; :func:`period_bounds` is their Python twin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Final, Protocol, cast

import redis.asyncio as aioredis
import redis.exceptions

from .errors import ServiceUnavailable
from .units import QuotaPeriod

__all__ = [
    "OVERRIDES_TTL",
    "PERIODS",
    "REDIS_ERRORS",
    "ApiLimits",
    "ApiUsage",
    "Keys",
    "Limits",
    "QuotaUsage",
    "ServerBudget",
    "ShadowUsage",
    "load_script",
    "newer_sight",
    "override_fields",
    "period_bounds",
    "read_usage",
    "replay_usage",
    "reset_overrides",
    "set_overrides",
]

PERIODS: Final[tuple[QuotaPeriod, ...]] = ("minute", "hour", "day", "month")
OVERRIDES_TTL: Final = 30 * 86_400  # seconds; `limits set` renews it, so only forgotten ones expire
# Redis is unreachable or temporarily unable to serve (failover, cluster reconfiguration).
REDIS_ERRORS: Final = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    OSError,
)


class _Rate(Protocol):
    @property
    def per_second(self) -> float: ...


class _Quota(Protocol):
    @property
    def limit(self) -> int: ...
    @property
    def period(self) -> QuotaPeriod: ...


class ApiLimits(Protocol):
    """The fields of ``config.ApiSettings`` the limiter reads."""

    @property
    def name(self) -> str: ...
    @property
    def rate(self) -> _Rate: ...
    @property
    def burst(self) -> int: ...
    @property
    def quotas(self) -> Sequence[_Quota]: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Effective numbers for one API: ``rate`` in calls/s, ``burst`` calls, period -> quota."""

    rate: float
    burst: int
    quotas: Mapping[QuotaPeriod, int] = field(default_factory=dict)

    @classmethod
    def of(cls, api: ApiLimits) -> Limits:
        """The configured limits."""
        return cls(api.rate.per_second, api.burst, {q.period: q.limit for q in api.quotas})

    def overridden(self, fields: Mapping[str, str]) -> Limits:
        """These limits with run-time overrides applied (a negative quota removes it)."""
        quotas = dict(self.quotas)
        for period in PERIODS:
            if (value := fields.get(f"quota:{period}")) is not None:
                quotas[period] = int(float(value))
        rate, burst = fields.get("rate"), fields.get("burst")
        return replace(
            self,
            rate=float(rate) if rate is not None else self.rate,
            burst=int(float(burst)) if burst is not None else self.burst,
            quotas={p: n for p, n in quotas.items() if n >= 0},
        )

    def replay_bucket(self, share: float) -> tuple[float, int]:
        """A replay lane's own bucket: ``(rate x share, max(1, floor(burst x share)))``."""
        return self.rate * share, max(1, math.floor(self.burst * share))

    def quota_args(self) -> list[int]:
        """Quota limits for minute, hour, day, month as the scripts take them (-1 = none)."""
        return [self.quotas.get(period, -1) for period in PERIODS]


def override_fields(
    *,
    rate: float | None = None,
    burst: int | None = None,
    quotas: Mapping[str, int | None] | None = None,
    shadow_rate: float | None = None,
    shadow_burst: int | None = None,
) -> dict[str, str]:
    """The overrides hash fields for ``limits set``; a quota of ``None`` removes that quota.

    A shadow rate without a shadow burst gets one second's worth of it (at least 1), as in the
    config; a shadow burst needs a shadow rate."""
    fields: dict[str, str] = {}
    if rate is not None:
        fields["rate"] = _rate_field("rate", rate)
    if burst is not None:
        fields["burst"] = _burst_field("burst", burst)
    if shadow_rate is not None:
        fields["shadow_rate"] = _rate_field("shadow rate", shadow_rate)
        fields["shadow_burst"] = _burst_field(
            "shadow burst",
            max(1, math.ceil(round(shadow_rate, 9))) if shadow_burst is None else shadow_burst,
        )
    elif shadow_burst is not None:
        raise ValueError("a shadow burst needs a shadow rate")
    for period, limit in (quotas or {}).items():
        if period not in PERIODS:
            raise ValueError(f"quota period must be one of {', '.join(PERIODS)}, got {period!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"a quota cannot be negative, got {limit}")
        fields[f"quota:{period}"] = str(-1 if limit is None else int(limit))
    return fields


def _rate_field(name: str, rate: float) -> str:
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"{name} must be a positive number of calls per second, got {rate}")
    return repr(float(rate))


def _burst_field(name: str, burst: int) -> str:
    if burst < 1:
        raise ValueError(f"{name} must be at least 1, got {burst}")
    return str(int(burst))


def period_bounds(period: QuotaPeriod, now: float) -> tuple[float, float, str]:
    """Start and end (epoch seconds) and key stamp of the UTC calendar period holding ``now``."""
    moment = datetime.fromtimestamp(math.floor(now), UTC)
    if period == "minute":
        start = moment.replace(second=0)
        end, stamp = start + timedelta(minutes=1), start.strftime("%Y-%m-%dT%H:%M")
    elif period == "hour":
        start = moment.replace(minute=0, second=0)
        end, stamp = start + timedelta(hours=1), start.strftime("%Y-%m-%dT%H")
    elif period == "day":
        start = moment.replace(hour=0, minute=0, second=0)
        end, stamp = start + timedelta(days=1), start.strftime("%Y-%m-%d")
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0)
        end, stamp = (start + timedelta(days=32)).replace(day=1), start.strftime("%Y-%m")
    return start.timestamp(), end.timestamp(), stamp


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of one API (see the module docstring)."""

    prefix: str

    @classmethod
    def of(cls, app_id: str, api: str) -> Keys:
        return cls(f"enricher:{{{app_id}:{api}}}:")

    @property
    def tat(self) -> str:
        return self.prefix + "tat"

    @property
    def blocked(self) -> str:
        return self.prefix + "blocked"

    @property
    def overrides(self) -> str:
        return self.prefix + "overrides"

    @property
    def quota_prefix(self) -> str:
        return self.prefix + "quota:"

    def quota(self, period: QuotaPeriod, stamp: str) -> str:
        return f"{self.quota_prefix}{period}:{stamp}"

    @property
    def epoch(self) -> str:
        """The current epoch's marker (recovery from lost state, ``lua/acquire.lua``)."""
        return self.quota_prefix + "epoch"

    @property
    def server_budget(self) -> str:
        return self.prefix + "server_budget"

    @property
    def granted(self) -> str:
        return self.prefix + "granted"

    @property
    def shadow_prefix(self) -> str:
        return self.prefix + "shadow:"

    @property
    def shadow(self) -> tuple[str, str, str]:
        """The shadow bucket's keys: TAT, delayed count, calls seen."""
        prefix = self.shadow_prefix
        return prefix + "tat", prefix + "delayed", prefix + "calls"

    @property
    def circuit(self) -> tuple[str, str, str]:
        """The circuit breaker's keys: open (cool-down end), failures, probe lease."""
        prefix = self.prefix + "circuit:"
        return prefix + "open", prefix + "failures", prefix + "probe"

    def replay_prefix(self, replay_id: str) -> str:
        return f"{self.prefix}replay:{replay_id}:"

    def replay_tat(self, replay_id: str) -> str:
        return self.replay_prefix(replay_id) + "tat"

    def replay_cap(self, replay_id: str, period: QuotaPeriod, stamp: str) -> str:
        return f"{self.replay_prefix(replay_id)}cap:{period}:{stamp}"

    def replay_used(self, replay_id: str, period: QuotaPeriod, stamp: str) -> str:
        return f"{self.replay_prefix(replay_id)}used:{period}:{stamp}"

    def acquire(self, replay_id: str | None = None) -> list[str]:
        """KEYS of ``acquire.lua``: seven for a live call, nine for a replay's call."""
        keys = [self.tat, self.blocked, self.overrides, self.quota_prefix]
        keys += [self.server_budget, self.granted, self.shadow_prefix]
        if replay_id is not None:
            keys += [self.replay_tat(replay_id), self.replay_prefix(replay_id)]
        return keys


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    """One quota in the current period: ``resets_at`` is the period's end (UTC)."""

    period: QuotaPeriod
    limit: int
    used: int
    remaining: int
    resets_at: datetime


@dataclass(frozen=True, slots=True)
class ShadowUsage:
    """A shadow limit (``limits set --shadow-rate``): of the ``calls`` granted since it was set,
    ``delayed`` would have had to wait under it."""

    rate: float
    burst: int
    delayed: int = 0
    calls: int = 0

    @classmethod
    def of(cls, overrides: Mapping[str, str], delayed: int, calls: int) -> ShadowUsage | None:
        rate, burst = overrides.get("shadow_rate"), overrides.get("shadow_burst")
        if rate is None:
            return None
        return cls(float(rate), int(float(burst or 1)), delayed, calls)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rate_per_second": self.rate,
            "burst": self.burst,
            "delayed": self.delayed,
            "calls": self.calls,
        }


@dataclass(frozen=True, slots=True)
class ServerBudget:
    """What the API's own rate-limit headers left: ``left`` calls until ``reset_at``, spread
    over every worker at ``pace`` calls/s (see ``lua/acquire.lua``)."""

    left: int
    reset_at: datetime
    pace: float

    @classmethod
    def of(cls, limit: int, reset_at: float, granted: int, now: float) -> ServerBudget | None:
        if reset_at <= now:
            return None
        left = limit - granted
        return cls(left, _utc(reset_at), max(0, left) / (reset_at - now))

    def as_dict(self) -> dict[str, Any]:
        return {
            "left": self.left,
            "reset_at": self.reset_at.isoformat(),
            "pace_per_second": self.pace,
        }


@dataclass(frozen=True, slots=True)
class ApiUsage:
    """What ``enricher limits show`` prints for one API.

    ``server`` is the budget the API's own rate-limit headers set (None: none known)."""

    api: str
    rate: float
    burst: int
    overrides: Mapping[str, str]
    quotas: tuple[QuotaUsage, ...]
    blocked_until: datetime | None
    shadow: ShadowUsage | None = None
    server: ServerBudget | None = None

    @classmethod
    def build(
        cls,
        api: ApiLimits,
        overrides: Mapping[str, str],
        used: Mapping[QuotaPeriod, int],
        blocked_until: float,
        now: float,
        *,
        shadow: tuple[int, int] = (0, 0),
        server: ServerBudget | None = None,
    ) -> ApiUsage:
        """Usage from raw figures (``used`` per period, times in epoch seconds; ``shadow`` is
        (delayed, calls))."""
        limits = Limits.of(api).overridden(overrides)
        quotas = tuple(
            QuotaUsage(
                p, n, used.get(p, 0), max(0, n - used.get(p, 0)), _utc(period_bounds(p, now)[1])
            )
            for p, n in sorted(limits.quotas.items(), key=lambda item: PERIODS.index(item[0]))
        )
        blocked = _utc(blocked_until) if blocked_until > now else None
        return cls(
            api.name,
            limits.rate,
            limits.burst,
            dict(overrides),
            quotas,
            blocked,
            ShadowUsage.of(overrides, *shadow),
            server,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; times are ISO-8601 UTC."""
        return {
            "api": self.api,
            "rate_per_second": self.rate,
            "burst": self.burst,
            "overrides": dict(self.overrides),
            "quotas": [
                {
                    "period": q.period,
                    "limit": q.limit,
                    "used": q.used,
                    "remaining": q.remaining,
                    "resets_at": q.resets_at.isoformat(),
                }
                for q in self.quotas
            ],
            "blocked_until": self.blocked_until.isoformat() if self.blocked_until else None,
            "shadow": self.shadow.as_dict() if self.shadow else None,
            "server": self.server.as_dict() if self.server else None,
        }


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@dataclass(frozen=True, slots=True)
class Sight:
    """An ``acquire.lua`` sight (``"<epoch> <grants> ..."``; ``""`` = none) with its order:
    by epoch, then grant counter. Replies to concurrent decisions may arrive out of order; the
    later state carries every count of the earlier one."""

    text: str
    order: tuple[int, int]

    @classmethod
    def of(cls, text: str) -> Sight:
        words = text.split(maxsplit=2)
        return cls(text, (int(words[0]), int(words[1])) if len(words) >= 2 else (-1, -1))

    def later(self, seen: Sight) -> Sight:
        """The later of this sight and ``seen`` (a tie keeps ``seen``)."""
        return seen if seen.order >= self.order else self


NO_SIGHT = Sight("", (-1, -1))


def newer_sight(held: str, seen: str) -> str:
    """:meth:`Sight.later` of two sights' texts."""
    return Sight.of(held).later(Sight.of(seen)).text


def load_script(name: str) -> str:
    """The text of a Lua script shipped in ``enricher/lua``."""
    return (resources.files("enricher.lua") / name).read_text(encoding="utf-8")


def text(value: object) -> str:
    """A Redis reply item as ``str`` (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def redis_now(client: aioredis.Redis) -> float:
    """Redis server time in epoch seconds."""
    seconds, micros = await client.time()
    return int(seconds) + int(micros) / 1e6


async def read_usage(client: aioredis.Redis, app_id: str, api: ApiLimits) -> ApiUsage:
    """Current usage of one API from Redis (``enricher limits show``)."""
    keys = Keys.of(app_id, api.name)
    try:
        now = await redis_now(client)
        stamps = {p: period_bounds(p, now)[2] for p in PERIODS}
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(keys.overrides)
        pipe.get(keys.blocked)
        pipe.hmget(keys.server_budget, ["limit", "reset_at"])
        pipe.get(keys.granted)
        pipe.mget(keys.shadow[1:])
        for period, stamp in stamps.items():
            pipe.get(keys.quota(period, stamp))
        raw_overrides, blocked, budget, granted, shadow, *counts = await pipe.execute()
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("redis", str(exc)) from exc
    overrides = {text(k): text(v) for k, v in cast(dict[Any, Any], raw_overrides).items()}
    used = {p: int(text(c)) for p, c in zip(PERIODS, counts, strict=True) if c is not None}
    blocked_until = int(text(blocked)) / 1e6 if blocked is not None else 0.0
    delayed, calls = (int(text(n)) if n is not None else 0 for n in shadow)
    server = None
    if None not in budget:
        number = int(text(granted)) if granted is not None else 0
        limit, reset_at = (int(text(n)) for n in budget)
        server = ServerBudget.of(limit, reset_at / 1e6, number, now)
    return ApiUsage.build(
        api, overrides, used, blocked_until, now, shadow=(delayed, calls), server=server
    )


async def replay_usage(
    client: aioredis.Redis, app_id: str, api: str, replay_id: str
) -> dict[QuotaPeriod, dict[str, int | None]]:
    """A replay's quota share of ``api`` in the current periods (``replay status``).

    ``{period: {"cap": units it may use, "used": units it used}}`` for each period in which the
    replay was granted a call (``cap`` is ``None`` if only calls made while Redis was unreachable
    were counted). Raises ServiceUnavailable.
    """
    keys = Keys.of(app_id, api)
    try:
        now = await redis_now(client)
        stamps = {p: period_bounds(p, now)[2] for p in PERIODS}
        pipe = client.pipeline(transaction=False)
        for period, stamp in stamps.items():
            pipe.get(keys.replay_cap(replay_id, period, stamp))
            pipe.get(keys.replay_used(replay_id, period, stamp))
        values = await pipe.execute()
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("redis", str(exc)) from exc
    usage: dict[QuotaPeriod, dict[str, int | None]] = {}
    for period, cap, used in zip(PERIODS, values[::2], values[1::2], strict=True):
        if cap is not None or used is not None:
            usage[period] = {
                "cap": int(text(cap)) if cap is not None else None,
                "used": int(text(used)) if used is not None else 0,
            }
    return usage


async def set_overrides(
    client: aioredis.Redis,
    app_id: str,
    api: str,
    *,
    rate: float | None = None,
    burst: int | None = None,
    quotas: Mapping[str, int | None] | None = None,
    shadow_rate: float | None = None,
    shadow_burst: int | None = None,
) -> None:
    """``limits set``: store overrides that every worker applies at its next decision.

    ``rate`` in calls/s; a quota of ``None`` removes that period's quota. A shadow rate (calls/s,
    with its burst) starts a new shadow count. The hash's TTL (:data:`OVERRIDES_TTL`) is renewed
    by every set. Raises ValueError, ServiceUnavailable.
    """
    fields = override_fields(
        rate=rate, burst=burst, quotas=quotas, shadow_rate=shadow_rate, shadow_burst=shadow_burst
    )
    if not fields:
        return
    keys = Keys.of(app_id, api)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.hset(keys.overrides, mapping={k: v for k, v in fields.items()})
        pipe.expire(keys.overrides, OVERRIDES_TTL)
        if "shadow_rate" in fields:
            pipe.delete(*keys.shadow)
        await pipe.execute()
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("redis", str(exc)) from exc


async def reset_overrides(
    client: aioredis.Redis, app_id: str, api: str, *, reset_usage: bool = False
) -> None:
    """``limits reset``: drop the overrides (the shadow limit and its counts too);
    ``reset_usage`` also drops this period's counters."""
    keys = Keys.of(app_id, api)
    try:
        doomed = [keys.overrides, *keys.shadow]
        if reset_usage:
            now = await redis_now(client)
            doomed += [keys.quota(p, period_bounds(p, now)[2]) for p in PERIODS]
        await client.delete(*doomed)
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("redis", str(exc)) from exc
