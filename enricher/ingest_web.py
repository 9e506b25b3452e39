"""``enricher ingest``: the HTTP server in front of :mod:`enricher.ingest`.

``POST /events`` (API key required) answers 200 when every event was accepted, 207 with one
result per event otherwise, and 400/401/413 when the whole request is refused. ``GET /health``
and ``GET /metrics`` answer without a key. The process holds one Kafka producer (``acks=all``)
for its lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from . import units
from .apikeys import ApiKeys, load_api_keys, presented_key
from .config import Config
from .errors import RefusedBatch
from .ingest import Ingestor, Outcome, event_limit, parse_batch, routes_for
from .ingest_metrics import IngestMetrics
from .kafka import ensure_topics, start_producer
from .metrics import METRICS_CONTENT_TYPE
from .schemas import SchemaRegistry

__all__ = ["IngestServer", "create_ingest_app", "serve_ingest", "start_ingest"]


@dataclass(frozen=True, slots=True)
class _State:
    ingestor: Ingestor
    keys: ApiKeys
    metrics: IngestMetrics
    max_batch_bytes: int
    max_batch_events: int


STATE = web.AppKey("ingest", _State)
logger = logging.getLogger(__name__)


async def _read_body(request: web.Request, limit: int) -> bytes:
    too_large = RefusedBatch(
        413, f"the body is over ingest.max_batch_bytes ({units.format_size(limit)})"
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None


async def post_events(request: web.Request) -> web.Response:
    """``POST /events``: a batch in, one result per event out."""
    state = request.app[STATE]
    started = time.monotonic()
    outcomes: list[Outcome] = []
    try:
        outcomes = await _ingest(request, state)
    except RefusedBatch as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.code == 401 else None
        response = web.json_response({"error": exc.message}, status=exc.code, headers=headers)
    else:
        counts = dict.fromkeys(("accepted", "rejected", "failed"), 0)
        for outcome in outcomes:
            counts[outcome.status] += 1
        if counts["failed"]:
            logger.warning("%d event(s) not acknowledged by the broker", counts["failed"])
        answer = {**counts, "results": [outcome.as_dict() for outcome in outcomes]}
        status = 200 if counts["accepted"] == len(outcomes) else 207
        response = web.json_response(answer, status=status)
    state.metrics.observe(response.status, outcomes, time.monotonic() - started)
    return response


async def _ingest(request: web.Request, state: _State) -> list[Outcome]:
    if not state.keys.accepts(presented_key(request.headers)):
        raise RefusedBatch(401, "missing or wrong API key")
    body = await _read_body(request, state.max_batch_bytes)
    events = parse_batch(body, state.max_batch_events)
    return await state.ingestor.ingest(events)


async def get_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format (no key needed)."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def get_health(request: web.Request) -> web.Response:
    """``GET /health``: the server is up (no key needed)."""
    return web.json_response({"ok": True})


def create_ingest_app(ingestor: Ingestor, keys: ApiKeys, config: Config) -> web.Application:
    """The aiohttp application (bodies over ``max_batch_bytes`` are refused unread)."""
    settings = config.ingest
    app = web.Application(client_max_size=settings.max_batch_bytes)
    metrics = IngestMetrics()
    app[STATE] = _State(
        ingestor, keys, metrics, settings.max_batch_bytes, settings.max_batch_events
    )
    app.router.add_post("/events", post_events)
    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)
    return app


@dataclass(frozen=True, slots=True)
class IngestServer:
    """A running ingestion server; :meth:`close` drains requests, then flushes the producer."""

    runner: web.AppRunner
    producer: Any
    registry: SchemaRegistry
    url: str

    async def close(self) -> None:
        try:
            await self.runner.cleanup()
        finally:
            await self.producer.stop()


async def start_ingest(
    config: Config, *, base_dir: Path, host: str | None = None, port: int | None = None
) -> IngestServer:
    """Load schemas and keys (ConfigError), connect to the broker (ServiceUnavailable), serve."""
    settings = config.ingest
    registry = SchemaRegistry.load(
        base_dir / settings.schemas,
        type_field=settings.type_field,
        version_field=settings.version_field,
    )
    routes = routes_for(config, registry)
    keys = load_api_keys(settings, base_dir)
    await ensure_topics(config, sorted({route.topic for route in routes.values()}))
    producer = await start_producer(config)
    ingestor = Ingestor(
        registry=registry,
        routes=routes,
        producer=producer,
        max_event_bytes=event_limit(config),
        ack_timeout=settings.ack_timeout,
    )
    app = create_ingest_app(ingestor, keys, config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.ack_timeout + 5)
    try:
        await runner.setup()
        bind = host or settings.host
        await web.TCPSite(runner, bind, settings.port if port is None else port).start()
    except BaseException:
        await runner.cleanup()
        await producer.stop()
        raise
    bound = int(runner.addresses[0][1])
    return IngestServer(runner, producer, registry, f"http://{_url_host(bind)}:{bound}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve_ingest(
    config: Config,
    *,
    base_dir: Path,
    host: str | None = None,
    port: int | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve in the foreground until SIGINT or SIGTERM, then drain and stop cleanly."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with _quiet("aiokafka"):  # a failed start is reported once, by the CLI
        server = await start_ingest(config, base_dir=base_dir, host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        schemas = "; ".join(
            f"{name} v{', v'.join(map(str, found))}"
            for name, found in server.registry.versions.items()
        )
        announce(f"ingest on {server.url}/events (schemas: {schemas}); Ctrl-C stops it")
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.close()


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence the ``name`` logger for a while."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)
