"""Serving the latest enrichment per key: what is stored, when, and where it comes from.

With ``serving.store`` ``table`` or ``redis`` the worker's sink is wrapped in a
:class:`ServingSink`: once the broker has acknowledged an output record (``topics.output``,
never a dead letter), its value is stored as the key's served state, so the store never shows
an enrichment the output topic lacks. ``GET /enrichments/{key}`` (:mod:`enricher.serving_web`)
answers it.

What "latest" means: the state of a key is the output of its input record with the highest
offset (in the input partition of the key). An output whose input is older than the stored one
never replaces it; an output of the same input (a replay of it, a redelivery after a crash)
does, so a replay that re-enriches a key's latest event refreshes what is served, and a replay
of older events leaves it alone. Outputs carry their input's coordinates in the
``enricher-source`` header (a replayed one those of the original input).

Stores (each with ``put``, ``get``, ``close``): :class:`MemoryEnrichments` here (tests, and the
rule in one place), :class:`~enricher.serving_table.TableEnrichments` (a Faust table) and
:class:`~enricher.serving_redis.RedisEnrichments`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from .errors import ServiceUnavailable
from .pipeline import Sink
from .records import SOURCE_HEADER, OutputRecord, parse_origin

__all__ = [
    "EnrichmentStore",
    "MemoryEnrichments",
    "Served",
    "ServingSink",
    "replaces",
    "served_from",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Served:
    """One key's served state: the output record's value and its input's coordinates."""

    topic: str
    partition: int
    offset: int
    value: bytes

    @property
    def source(self) -> str:
        """``topic/partition/offset`` of the input record, as in the ``enricher-source`` header."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    def encode(self) -> bytes:
        """``<source>\\n<value>`` (topic names hold no line break)."""
        return self.source.encode() + b"\n" + self.value

    @classmethod
    def decode(cls, raw: bytes) -> Served | None:
        """The inverse of :meth:`encode`; None for bytes that are not one of ours."""
        head, newline, value = raw.partition(b"\n")
        origin = parse_origin(head.decode("utf-8", "replace")) if newline else None
        if origin is None:
            return None
        return cls(origin[0], origin[1], origin[2], value)


def replaces(new: Served, current: Served | None) -> bool:
    """Whether ``new`` becomes the served state over ``current`` (see the module docstring).
    Another partition (the input topic was repartitioned): the newcomer wins."""
    if current is None or (new.topic, new.partition) != (current.topic, current.partition):
        return True
    return new.offset >= current.offset


def served_from(record: OutputRecord) -> Served | None:
    """The served state an output record makes; None without a parsable source header."""
    for name, raw in record.headers:
        if name == SOURCE_HEADER:
            origin = parse_origin(raw.decode("utf-8", "replace"))
            return Served(origin[0], origin[1], origin[2], record.value) if origin else None
    return None


class EnrichmentStore(Protocol):
    """Where served states live. ``put`` applies :func:`replaces`; both raise
    :class:`~enricher.errors.ServiceUnavailable` when the store cannot be reached."""

    async def put(self, key: bytes, served: Served) -> None: ...
    async def get(self, key: bytes) -> Served | None: ...
    async def close(self) -> None: ...


class MemoryEnrichments:
    """Served states in a dict of this process (tests; the rule without any I/O)."""

    def __init__(self) -> None:
        self.data: dict[bytes, Served] = {}

    async def put(self, key: bytes, served: Served) -> None:
        if replaces(served, self.data.get(key)):
            self.data[key] = served

    async def get(self, key: bytes) -> Served | None:
        return self.data.get(key)

    async def close(self) -> None:
        return None


class ServingSink:
    """A :class:`~enricher.pipeline.Sink` that stores each acknowledged output in ``store``.

    A store failure never fails the event (the output is written; serving is secondary): it is
    counted in ``failures`` and logged (the first, then every 1000th), and the key's next output
    repairs it.
    """

    def __init__(self, inner: Sink, store: EnrichmentStore, *, output_topic: str) -> None:
        self._inner = inner
        self._store = store
        self._output_topic = output_topic
        self.failures = 0

    async def write(self, record: OutputRecord) -> None:
        await self._inner.write(record)
        if record.topic != self._output_topic or record.key is None:
            return
        served = served_from(record)
        if served is None:
            return
        try:
            await self._store.put(record.key, served)
        except ServiceUnavailable as exc:
            self._failed(served, exc)
        except Exception as exc:  # a bug here must not hold the event: serving is secondary
            log.exception("serving: unexpected error storing %s", served.source)
            self._failed(served, exc)

    def _failed(self, served: Served, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning(
                "serving: could not store %s (%d failures so far): %s",
                served.source,
                self.failures,
                exc,
            )
