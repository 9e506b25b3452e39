"""Ingestion, the use case behind ``POST /events``: a batch in, one outcome per event out.

Each event is checked on its own (a JSON object, at most ``ingest.max_event_bytes``, valid against
its own type and version's schema, carrying its key field); the valid ones are published to their
type's topic, keyed by its key field, and are reported accepted only once the broker acknowledged
them. A bad event never sinks its batch, and an event the broker did not acknowledge is reported
``failed``, never ``accepted``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

from aiokafka.errors import KafkaError

from . import units
from .config import Config
from .errors import ConfigError, RefusedBatch, RejectedEvent
from .produce import key_for
from .records import compact_json
from .schemas import SchemaId, SchemaRegistry

__all__ = [
    "Ingestor",
    "Outcome",
    "Prepared",
    "Producer",
    "Route",
    "event_limit",
    "parse_batch",
    "routes_for",
]

Status = Literal["accepted", "rejected", "failed"]
SCHEMA_HEADER = "enricher-schema"


class Producer(Protocol):
    """What ingestion needs of a Kafka producer (aiokafka's ``AIOKafkaProducer``)."""

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        *,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]: ...


@dataclass(frozen=True, slots=True)
class Route:
    """Where events of one type go."""

    topic: str
    key_field: str


@dataclass(frozen=True, slots=True)
class Prepared:
    """A valid event, encoded and routed, ready to publish."""

    index: int
    schema: SchemaId
    topic: str
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """One event's line in the answer (``None`` fields are left out of it)."""

    index: int
    status: Status
    code: int
    schema: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    reason: str | None = None
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of this outcome."""
        items = ((f.name, getattr(self, f.name)) for f in fields(self))
        return {key: value for key, value in items if value is not None}


def routes_for(config: Config, registry: SchemaRegistry) -> dict[str, Route]:
    """The route of every type with a schema; ConfigError for a route naming no known type."""
    ingest = config.ingest
    for name in ingest.routes:
        if name not in registry.versions:
            raise ConfigError(f"ingest.routes.{name}", "no schema for this event type")
    routes = {}
    for name in registry.versions:
        route = ingest.routes.get(name)
        topic = (route.topic if route else None) or config.topics.input
        key_field = (route.key_field if route else None) or ingest.key_field
        routes[name] = Route(topic, key_field)
    return routes


def event_limit(config: Config) -> int:
    """The largest event accepted: ``ingest.max_event_bytes``, by default the workers' limit."""
    ingest = config.ingest
    limit = ingest.max_event_bytes or config.worker.max_event_bytes
    return min(limit, ingest.max_batch_bytes)


def parse_batch(body: bytes, max_events: int) -> list[Any]:
    """The events of a request body: a JSON array, or an object ``{"events": [...]}``."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise RefusedBatch(400, f"the body is not valid JSON: {_first_line(exc)}") from None
    if isinstance(data, dict) and data.keys() == {"events"}:
        data = data["events"]
    if not isinstance(data, list):
        raise RefusedBatch(400, 'expected a JSON array of events, or {"events": [...]}')
    if len(data) > max_events:
        raise RefusedBatch(
            400, f"{len(data)} events in one batch; ingest.max_batch_events is {max_events}"
        )
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


class Ingestor:
    """Checks, routes and publishes batches of events."""

    def __init__(
        self,
        *,
        registry: SchemaRegistry,
        routes: Mapping[str, Route],
        producer: Producer,
        max_event_bytes: int,
        ack_timeout: float,
    ) -> None:
        self.registry = registry
        self.routes = dict(routes)
        self.producer = producer
        self.max_event_bytes = max_event_bytes
        self.ack_timeout = ack_timeout

    async def ingest(self, events: Sequence[Any]) -> list[Outcome]:
        """One outcome per event, in order; returns once the broker answered for every send."""
        outcomes: dict[int, Outcome] = {}
        ready: list[Prepared] = []
        for index, event in enumerate(events):
            try:
                ready.append(self.prepare(index, event))
            except RejectedEvent as exc:
                outcomes[index] = Outcome(
                    index, "rejected", exc.code, reason=exc.reason, path=exc.path
                )
        for outcome in await publish(self.producer, ready, self.ack_timeout):
            outcomes[outcome.index] = outcome
        return [outcomes[index] for index in range(len(events))]

    def prepare(self, index: int, event: Any) -> Prepared:
        """The event encoded and routed; RejectedEvent if it cannot be published."""
        if not isinstance(event, dict):
            raise RejectedEvent(422, "not a JSON object")
        value = compact_json(event)
        if len(value) > self.max_event_bytes:
            limit = units.format_size(self.max_event_bytes)
            raise RejectedEvent(413, f"{len(value)} bytes, over ingest.max_event_bytes ({limit})")
        schema = self.registry.check(event)
        route = self.routes[schema.type]
        key = key_for(event, route.key_field)
        if key is None:
            raise RejectedEvent(
                422, f"no key: {route.key_field!r} is missing or null", path=f"$.{route.key_field}"
            )
        return Prepared(index, schema, route.topic, key, value)


async def publish(producer: Producer, items: Sequence[Prepared], timeout: float) -> list[Outcome]:
    """Send every item in order, then wait (``timeout`` in all) for every acknowledgement."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sends: list[asyncio.Future[Any] | BaseException] = []
    for item in items:
        headers = [(SCHEMA_HEADER, str(item.schema).encode())]
        try:
            async with asyncio.timeout_at(deadline):
                sends.append(
                    await producer.send(item.topic, item.value, key=item.key, headers=headers)
                )
        except (KafkaError, OSError, TimeoutError) as exc:
            sends.append(exc)
    futures = [sent for sent in sends if isinstance(sent, asyncio.Future)]
    if futures:
        await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
    return [_outcome(item, sent) for item, sent in zip(items, sends, strict=True)]


def _outcome(item: Prepared, sent: asyncio.Future[Any] | BaseException) -> Outcome:
    schema = str(item.schema)
    if isinstance(sent, TimeoutError):
        return _failed(item, 504, "not sent within ingest.ack_timeout")
    if isinstance(sent, BaseException):
        return _failed(item, 503, f"not sent: the broker failed ({type(sent).__name__})")
    if not sent.done():
        sent.add_done_callback(_ignore_late_result)
        return _failed(
            item, 504, "not acknowledged within ingest.ack_timeout; it may still be written"
        )
    error = sent.exception() if not sent.cancelled() else asyncio.CancelledError()
    if error is not None:
        return _failed(item, 503, f"the broker did not acknowledge it ({type(error).__name__})")
    meta = sent.result()
    return Outcome(
        item.index,
        "accepted",
        201,
        schema=schema,
        topic=meta.topic,
        partition=meta.partition,
        offset=meta.offset,
    )


def _failed(item: Prepared, code: int, reason: str) -> Outcome:
    return Outcome(
        item.index, "failed", code, schema=str(item.schema), topic=item.topic, reason=reason
    )


def _ignore_late_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning
