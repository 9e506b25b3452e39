"""The distributed rate limiter: one atomic Redis script per decision, shared by all workers.

Every decision runs ``lua/acquire.lua`` (GCRA reservation + UTC calendar quotas + run-time
overrides + Retry-After blocks, with Redis ``TIME``); a granted caller sleeps its reserved wait and
then calls, so callers are paced by reservation instead of polling. Keys and TTLs: see
:mod:`enricher.quota`.

A replay's call (``acquire(api, lane)``) passes the same checks in the same script and, on top,
its own lane: a bucket of ``share`` of the rate and ``share`` of each quota's remaining budget
(see the header of ``lua/acquire.lua``), so live calls keep the rest.

When Redis cannot be reached (connection refused, timeout, OSError):

- ``pause``: no call is made. Waiters hold and probe Redis on one shared schedule backing off
  exponentially (50 ms to 2 s); one warning per outage. Calls resume by themselves.
- ``local``: each worker falls back to :class:`~enricher.local_limiter.LocalFallback` (``rate x
  local_share``; a replay's calls ``rate x local_share x share``) and probes Redis at the same
  backoff. When Redis is back, the calls made locally are added to the shared quota counters
  (and to the replays' own counters; ``INCRBY``, best effort) and local blocks are pushed.

A Retry-After (``block``) is also kept in-process, so this worker obeys it even if Redis is down.

The API's own rate-limit headers (``server_signal``, fed by the caller with the number of the
grant whose answer carried them) are shared the same way: ``lua/server_budget.lua`` keeps what the
server has left until its reset, and every worker's next decision paces by it (``acquire.lua``);
none left also blocks the API until the server's reset.

Each decision hands back the worker's latest ``sight`` of the shared state (epoch, grant counter,
quota counters): if Redis lost its state, the script starts a new epoch that fails closed and
restores the counters from the workers' sights (``lua/acquire.lua``, "Recovery from lost state").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions

from .errors import ServiceUnavailable
from .lanes import Lane
from .local_limiter import Clock, Decision, LimiterBase, LocalFallback, MemoryLimiter, Sleep
from .quota import (
    NO_SIGHT,
    PERIODS,
    REDIS_ERRORS,
    ApiLimits,
    ApiUsage,
    Keys,
    Limits,
    Sight,
    load_script,
    period_bounds,
    read_usage,
    replay_usage,
    reset_overrides,
    set_overrides,
    text,
)
from .script_batch import ScriptBatcher
from .units import QuotaPeriod

__all__ = [
    "Limiter",
    "MemoryLimiter",
    "RedisLimiter",
    "acquire_args",
    "parse_reply",
    "reply_sight",
]

log = logging.getLogger("enricher.limiter")

PROBE_MIN, PROBE_MAX = 0.05, 2.0  # seconds between Redis probes during an outage


class Limiter(Protocol):
    """What the caller and the worker need from a limiter."""

    async def acquire(self, api: str, lane: Lane | None = None) -> int | None:
        """Wait until one call to ``api`` may be made now; takes one token of the API's bucket
        and one unit of each of its quotas. Holds (sleeps, without busy-looping) while a quota is
        spent or the API is blocked. Raises ShuttingDown if close() is called while waiting.
        Returns the grant's number (None if unknown), for :meth:`server_signal`.

        ``lane=None`` is a live call; a replay's call also takes a token of its lane's bucket
        (``share`` of the rate) and a unit of its share of each quota, and is held while either
        is spent (its share of a quota until the period ends)."""

    async def block(self, api: str, seconds: float) -> None:
        """Pause calls to ``api`` from every worker for ``seconds`` (server's Retry-After)."""

    async def server_signal(
        self, api: str, remaining: int, reset: float, grant: int | None = None
    ) -> None:
        """The answer to the call granted as number ``grant`` said ``remaining`` calls are left
        for ``reset`` seconds: every worker keeps within that, evenly paced (none left: block)."""

    async def close(self) -> None:
        """Make pending and later ``acquire`` calls raise ShuttingDown."""


def acquire_args(
    limits: Limits,
    max_wait: float,
    now_us: int | None = None,
    share: float | None = None,
    sight: str | None = None,
) -> list[str]:
    """ARGV of ``acquire.lua``; ``now_us`` fakes Redis time (tests only); ``share`` is a replay
    lane's share (with the replay's KEYS, see :meth:`Keys.acquire`), ``None`` for a live call;
    ``sight`` the caller's last sight (``""``: none yet; ``None``: no recovery from lost state)."""
    numbers = [limits.rate, limits.burst, round(max_wait * 1e6), *limits.quota_args()]
    args = [*(repr(n) for n in numbers), "" if now_us is None else str(now_us)]
    if share is not None or sight is not None:
        args.append("" if share is None else repr(float(share)))
    return args if sight is None else [*args, sight]


def reply_sight(reply: list[Any]) -> str:
    """The ``sight`` of an ``acquire.lua`` reply (``""`` if it has none)."""
    return text(reply[9]) if len(reply) > 9 else ""


def parse_reply(reply: list[Any]) -> Decision:
    """The ``acquire.lua`` reply as a Decision (times in seconds)."""
    granted, wait_us, reason, *remaining, rate, number = reply[:9]
    quotas = {p: n for p, n in zip(PERIODS, remaining, strict=True) if n >= 0}
    return Decision(
        granted=granted == 1,
        wait=wait_us / 1e6,
        reason=text(reason) if reason else "",
        remaining=quotas,
        rate=float(rate),  # float() takes the bytes or str of a number as they come
        grant=number if number >= 0 else None,
    )


class _Health:
    """Redis reachability: one shared probe schedule and one log line per outage."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.down_since: float | None = None
        self.failures = 0
        self.next_probe = 0.0

    def may_probe(self, now: float) -> bool:
        return self.down_since is None or now >= self.next_probe

    def failed(self, now: float, exc: BaseException) -> None:
        if self.down_since is not None and now < self.next_probe:
            return  # another waiter's probe of this round already failed
        self.failures += 1
        self.next_probe = now + min(PROBE_MAX, PROBE_MIN * 2 ** (self.failures - 1))
        if self.down_since is None:
            self.down_since = now
            action = "calls paused" if self.mode == "pause" else "using local limits"
            log.warning("Redis unreachable (%s: %s); %s", type(exc).__name__, exc, action)

    def recovered(self, now: float) -> bool:
        if self.down_since is None:
            return False
        log.warning("Redis reachable again after %.1fs", now - self.down_since)
        self.down_since, self.failures, self.next_probe = None, 0, 0.0
        return True


class RedisLimiter(LimiterBase):
    """Limits shared through Redis by every worker of one ``app_id``.

    ``redis`` is owned by the caller (not closed here); it should have socket timeouts.
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        app_id: str,
        apis: Mapping[str, ApiLimits],
        on_unavailable: str = "pause",
        local_share: float = 0.25,
        max_wait: float = 1.0,
        retry_cap: float = 1.0,
        redis_timeout: float = 2.0,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if on_unavailable not in ("pause", "local"):
            raise ValueError(f"on_unavailable must be 'pause' or 'local', got {on_unavailable!r}")
        if not 0 < local_share <= 1:
            raise ValueError(f"local_share must be in (0, 1], got {local_share}")
        super().__init__(max_wait=max_wait, retry_cap=retry_cap, sleep=sleep)
        self._redis = redis
        self._app_id = app_id
        self._apis = dict(apis)
        self._keys = {name: Keys.of(app_id, name) for name in self._apis}
        self._limits = {name: Limits.of(api) for name, api in self._apis.items()}
        self._timeout = redis_timeout
        self._clock = clock
        # Concurrent decisions share a pipeline (about one round trip for many calls), and
        # identical ones one script run (a bulk: see acquire.lua).
        self._acquire_batch = ScriptBatcher(
            redis, load_script("acquire.lua"), timeout=redis_timeout, bulk=True
        )
        self._block_script = redis.register_script(load_script("block.lua"))
        # An API's rate-limit headers come with every answer: their stores share pipelines too.
        self._budget_batch = ScriptBatcher(
            redis, load_script("server_budget.lua"), timeout=redis_timeout
        )
        self._health = _Health(on_unavailable)
        self._local = (
            LocalFallback(self._apis, local_share, clock) if on_unavailable == "local" else None
        )
        self._local_blocked: dict[str, float] = {}
        self._sights: dict[str, Sight] = {}  # per API, the latest (recovery from lost state)
        # A decision's KEYS and ARGV but the sight are the same for every live call of an API
        # (and every call of a replay at one share): built once, not per call.
        self._live_keys = {name: keys.acquire() for name, keys in self._keys.items()}
        self._args: dict[tuple[str, float | None], list[str]] = {}

    async def close(self) -> None:
        """Make pending and later ``acquire`` calls raise ShuttingDown; stop the batchers."""
        await super().close()
        await self._acquire_batch.close()
        await self._budget_batch.close()

    def _check(self, api: str) -> None:
        if api not in self._apis:
            raise ValueError(f"unknown API {api!r}")

    async def _decide(self, api: str, lane: Lane | None) -> Decision:
        now = self._clock()
        if (until := self._local_blocked.get(api, 0.0)) > now:
            return Decision(False, until - now, "blocked")
        if not self._health.may_probe(now):
            return await self._fallback(api, now, lane)
        sight = self._sights.get(api, NO_SIGHT)
        if lane is None:
            keys, args = self._live_keys[api], [*self._fixed_args(api, None), sight.text]
        else:
            keys = self._keys[api].acquire(lane.replay_id)
            args = [*self._fixed_args(api, lane.share), sight.text]
        try:
            reply = await self._acquire_batch.call(keys, args)
        except REDIS_ERRORS as exc:
            self._health.failed(self._clock(), exc)
            return await self._fallback(api, now, lane)
        except redis.exceptions.RedisError as exc:
            raise ServiceUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc
        if self._health.recovered(self._clock()):
            await self._resync()
        # Replies may come out of order: keep the latest state (others may have come meanwhile).
        held = self._sights.get(api, NO_SIGHT)
        self._sights[api] = held.later(Sight.of(reply_sight(reply)))
        decision = parse_reply(reply)
        if self._local is not None:
            self._local.observe(api, decision, now, lane)
        return decision

    def _fixed_args(self, api: str, share: float | None) -> list[str]:
        """``acquire.lua``'s ARGV for ``api`` at ``share`` (None: live), but the sight."""
        args = self._args.get((api, share))
        if args is None:
            args = acquire_args(self._limits[api], self._max_wait, share=share, sight="")[:-1]
            self._args[(api, share)] = args
        return args

    async def _fallback(self, api: str, now: float, lane: Lane | None) -> Decision:
        if self._local is not None:
            return await self._local.decide(api, lane)
        return Decision(False, max(0.0, self._health.next_probe - now), "redis")

    async def _resync(self) -> None:
        """After an outage: add local calls to the shared quotas (and replays' used counters)
        and push local blocks."""
        now = self._clock()
        counted: list[tuple[str, QuotaPeriod, str, int]] = []
        if self._local is not None:
            for (api, period, stamp), count in self._local.take_counts().items():
                counted.append((self._keys[api].quota(period, stamp), period, stamp, count))
            for (api, replay_id, period, stamp), count in self._local.take_replay_counts().items():
                key = self._keys[api].replay_used(replay_id, period, stamp)
                counted.append((key, period, stamp, count))
        try:
            for key, period, stamp, count in counted:
                _, end, current = period_bounds(period, now)
                if count and current == stamp:
                    pipe = self._redis.pipeline(transaction=True)
                    pipe.incrby(key, count)
                    pipe.pexpire(key, int((end - now + 60) * 1000))
                    await asyncio.wait_for(pipe.execute(), self._timeout)
            for api, until in list(self._local_blocked.items()):
                if until > now:
                    await self._store_block(api, until - now)
        except (*REDIS_ERRORS, redis.exceptions.RedisError) as exc:
            log.warning("could not resync local limiter state to Redis: %s", exc)

    async def block(self, api: str, seconds: float) -> None:
        """Block ``api`` for every worker (and locally, in case Redis is unreachable)."""
        self._check(api)
        if seconds <= 0 or self._guard.closed:
            return
        until = self._clock() + seconds
        self._local_blocked[api] = max(self._local_blocked.get(api, 0.0), until)
        try:
            await self._store_block(api, seconds)
        except REDIS_ERRORS as exc:
            self._health.failed(self._clock(), exc)
        except redis.exceptions.RedisError as exc:  # never fail the caller's retry path
            log.warning("could not store a block in Redis: %s: %s", type(exc).__name__, exc)

    async def server_signal(
        self, api: str, remaining: int, reset: float, grant: int | None = None
    ) -> None:
        """Follow the API's own figures for every worker: after grant number ``grant``,
        ``remaining`` calls until ``reset`` seconds from now (``lua/server_budget.lua``); with
        none left, also block the API until the reset. Never raises for Redis: the figures are
        advice, and the call they came with is already made."""
        self._check(api)
        if reset <= 0 or self._guard.closed:
            return
        if remaining <= 0:
            await self.block(api, reset)
        keys = self._keys[api]
        number = "" if grant is None else str(grant)
        args = [str(max(0, int(remaining))), repr(float(reset)), number]
        try:
            await self._budget_batch.call([keys.server_budget, keys.granted], args)
        except REDIS_ERRORS as exc:
            self._health.failed(self._clock(), exc)
        except redis.exceptions.RedisError as exc:
            log.warning("could not store a server budget: %s: %s", type(exc).__name__, exc)

    async def _store_block(self, api: str, seconds: float) -> None:
        script = self._block_script(keys=[self._keys[api].blocked], args=[repr(seconds)])
        await asyncio.wait_for(script, self._timeout)

    async def usage(self, api: str) -> ApiUsage:
        """Effective limits and current usage of ``api`` (raises ServiceUnavailable)."""
        self._check(api)
        return await read_usage(self._redis, self._app_id, self._apis[api])

    async def replay_usage(
        self, api: str, replay_id: str
    ) -> dict[QuotaPeriod, dict[str, int | None]]:
        """A replay's ``{period: {"cap": ..., "used": ...}}`` of ``api`` in the current periods
        (raises ServiceUnavailable); see :func:`enricher.quota.replay_usage`."""
        self._check(api)
        return await replay_usage(self._redis, self._app_id, api, replay_id)

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
        """Override ``api``'s rate (calls/s), burst or quotas for every worker, or set a shadow
        limit (measured, not enforced)."""
        self._check(api)
        await set_overrides(
            self._redis,
            self._app_id,
            api,
            rate=rate,
            burst=burst,
            quotas=quotas,
            shadow_rate=shadow_rate,
            shadow_burst=shadow_burst,
        )

    async def reset_overrides(self, api: str, *, reset_usage: bool = False) -> None:
        """Drop ``api``'s overrides (and with ``reset_usage`` its current quota counters)."""
        self._check(api)
        await reset_overrides(self._redis, self._app_id, api, reset_usage=reset_usage)
