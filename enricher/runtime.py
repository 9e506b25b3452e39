"""The worker's long-lived parts, built once at start and closed in order at shutdown.

No Faust here: the Faust layer (``app.py``) passes in the sink that writes records and the
callback that acks events, so the whole chain is testable without a broker.

The enricher reaches the caller, and the caller the limiter, through the counting proxies of
:mod:`enricher.metrics` (calls by outcome, token waits, HTTP attempts by result): ``stats``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import aiohttp
import redis.asyncio as aioredis

from .caller import ApiCaller
from .circuit import CircuitBreaker
from .config import Config
from .enrich import Enricher
from .lanes import Lane
from .limiter import RedisLimiter
from .metrics import MeteredClient, MeteredLimiter, WorkerStats, metered_session
from .pipeline import Pipeline, Sink
from .redis_cache import RedisResponseCache
from .replay import ReplayRegistry

__all__ = ["Runtime", "connect_redis"]

T = TypeVar("T")


REDIS_CONNECTIONS = 100  # per worker process; more concurrent commands wait for one


def connect_redis(config: Config) -> aioredis.Redis:
    """A Redis client for the configured URL (``rediss://`` for TLS); connects lazily.

    Its pool *waits* (up to the socket timeout) for a free connection: the default pool raises
    ``MaxConnectionsError`` at once, which a burst of concurrent cache lookups (one per event in
    flight) turned into "Redis unavailable": calls made without the cache, and paused."""
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis.url,
        max_connections=REDIS_CONNECTIONS,
        timeout=2.0,
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
        health_check_interval=10,
    )
    return aioredis.Redis.from_pool(pool)


def http_session() -> aiohttp.ClientSession:
    """The worker's single HTTP session; per-API semaphores bound what is in flight."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, trust_env=False)
    # aiohttp (3.10+) silently sends a GET again when the connection drops: a call the API sees
    # without a token of ours. Every attempt must take its own token, so the retry policy decides.
    # No public switch; aiohttp's own test_utils sets the same attribute.
    session._retry_connection = False
    return session


class Runtime(Generic[T]):
    """Redis client, limiter, cache, HTTP session, caller, enricher, replay registry and the two
    pipelines (live events, replayed events) of one worker."""

    def __init__(
        self,
        config: Config,
        *,
        sink: Sink,
        release: Callable[[T], Awaitable[None]],
        redis: aioredis.Redis | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.config = config
        self.stats = WorkerStats(config.apis)
        self.redis = redis if redis is not None else connect_redis(config)
        self.session = session if session is not None else http_session()
        self.limiter = RedisLimiter(
            redis=self.redis,
            app_id=config.app_id,
            apis=config.apis,
            on_unavailable=config.redis.on_unavailable,
            local_share=config.redis.local_share,
        )
        self.cache = RedisResponseCache(redis=self.redis, app_id=config.app_id)
        self.caller = ApiCaller(
            apis=config.apis,
            limiter=MeteredLimiter(self.limiter, self.stats),
            session=metered_session(self.session, self.stats),  # HTTP attempts by result
            cache=self.cache,
            circuits=CircuitBreaker(redis=self.redis, app_id=config.app_id, apis=config.apis),
        )
        self.enricher = Enricher(config, MeteredClient(self.caller, self.stats))
        self.replays = ReplayRegistry(self.redis, config.app_id)
        self.default_share = min((api.replay_share for api in config.apis.values()), default=1.0)

        def pipeline(replays: ReplayRegistry | None) -> Pipeline[T]:
            return Pipeline(
                enricher=self.enricher,
                sink=sink,
                topics=config.topics,
                in_flight=config.worker.in_flight,
                release=release,
                replays=replays,
            )

        self.limiter.on_replay_hold = self._on_replay_hold
        # Separate in-flight pools: a replay held at its share never takes live events' slots.
        self.pipeline = pipeline(None)
        self.replay_pipeline = pipeline(self.replays)

    async def _on_replay_hold(self, api: str, lane: Lane, reason: str | None) -> None:
        """Say in the replay's status why it stopped (and clear it when it goes on)."""
        if reason is None:
            await self.replays.set_state(lane.replay_id, "running", note="", from_states=["held"])
            return
        period = reason.partition(":")[2]
        note = (
            f"held: its share of the {period} quota of API {api} is spent (live traffic keeps "
            "the rest); it goes on when the period resets or the quota is raised"
        )
        await self.replays.set_state(lane.replay_id, "held", note=note, from_states=["running"])

    async def replay_lane(self, replay_id: str) -> Lane:
        """The lane of a replayed event: its replay's share (the config's lowest
        ``replay_share`` if the registry cannot tell)."""
        lane = await self.replays.lane(replay_id)
        return lane if lane is not None else Lane(replay_id, self.default_share)

    async def close(self, grace: float) -> None:
        """:meth:`drain`, then :meth:`disconnect`."""
        await self.drain(grace)
        await self.disconnect()

    async def drain(self, grace: float) -> None:
        """Take no new event; let in-flight ones finish (tokens still granted) within ``grace``;
        then cancel what has not begun writing (token waits included: PITFALLS 5), leaving it
        unwritten and unacked; writes already begun get a little longer to be acknowledged.
        Bounded (``grace`` + the pipeline's ``write_wait``), so no supervisor has to SIGKILL us."""
        await asyncio.gather(self.pipeline.close(grace), self.replay_pipeline.close(grace))
        await self.caller.close()  # calls held by an open circuit raise ShuttingDown

    async def disconnect(self) -> None:
        """Close the limiter, the cache and the connections (after :meth:`drain`)."""
        await self.limiter.close()
        await self.cache.close()
        await self.session.close()
        await self.redis.aclose()
