"""Kafka record shapes in and out, and the wire format of output and dead-letter records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import TopicSettings
from .enrich import DeadLetter, Dropped, Enriched, Outcome
from .errors import EventError
from .lanes import Lane

__all__ = [
    "ORIGIN_HEADER",
    "REPLAY_HEADER",
    "SOURCE_HEADER",
    "InputRecord",
    "OutputRecord",
    "compact_json",
    "dead_letter_record",
    "output_for",
    "parse_origin",
]

SOURCE_HEADER = "enricher-source"
REPLAY_HEADER = "enricher-replay"
ORIGIN_HEADER = "enricher-origin"  # on replay-topic records: the original input's coordinates


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One consumed record (what the pipeline needs of a Kafka message).

    ``topic/partition/offset`` is where it was consumed. A replayed record also has ``lane`` (its
    replay) and ``origin``, the coordinates of the original input record it re-feeds.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    lane: Lane | None = None
    origin: tuple[str, int, int] | None = None

    @property
    def replay_id(self) -> str | None:
        return self.lane.replay_id if self.lane else None

    @property
    def source(self) -> str:
        """``topic/partition/offset`` of the original input: the idempotency key downstream.
        A replayed event's output carries the same source as the original's."""
        topic, partition, offset = self.origin or (self.topic, self.partition, self.offset)
        return f"{topic}/{partition}/{offset}"


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One record to produce, with the same key as its input."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def parse_origin(header: str | None) -> tuple[str, int, int] | None:
    """``topic/partition/offset`` of an ``enricher-origin`` header; None if absent or malformed."""
    parts = header.rsplit("/", 2) if header else []
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


# json.dumps with keywords builds an encoder per call: one, kept (it keeps no state between).
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def compact_json(value: Any) -> bytes:
    """The one JSON encoding of records: compact, UTF-8, non-ASCII kept."""
    return _COMPACT.encode(value).encode()


def _headers(record: InputRecord) -> tuple[tuple[str, bytes], ...]:
    source = (SOURCE_HEADER, record.source.encode())
    if record.replay_id is None:
        return (source,)
    return (source, (REPLAY_HEADER, record.replay_id.encode()))


def _source_dict(record: InputRecord) -> dict[str, Any]:
    topic, partition, offset = record.origin or (record.topic, record.partition, record.offset)
    return {"topic": topic, "partition": partition, "offset": offset}


def dead_letter_record(
    record: InputRecord, event: dict[str, Any] | str, error: EventError, topics: TopicSettings
) -> OutputRecord:
    """The dead-letter record of contract section 3."""
    body = {
        "event": event,
        "error": error.as_dict(),
        "source": _source_dict(record),
    }
    return OutputRecord(topics.dead_letter, record.key, compact_json(body), _headers(record))


def output_for(record: InputRecord, outcome: Outcome, topics: TopicSettings) -> OutputRecord | None:
    """The record an outcome produces: output, dead letter, or None for a dropped event."""
    if isinstance(outcome, Enriched):
        return OutputRecord(
            topics.output, record.key, compact_json(outcome.event), _headers(record)
        )
    if isinstance(outcome, DeadLetter):
        return dead_letter_record(record, outcome.event, outcome.error, topics)
    assert isinstance(outcome, Dropped)
    return None
