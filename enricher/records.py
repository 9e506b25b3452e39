"""Kafka record shapes in and out, and the wire format of output and dead-letter records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import TopicSettings
from .enrich import DeadLetter, Dropped, Enriched, Outcome
from .errors import EventError

__all__ = [
    "REPLAY_HEADER",
    "SOURCE_HEADER",
    "InputRecord",
    "OutputRecord",
    "dead_letter_record",
    "output_for",
]

SOURCE_HEADER = "enricher-source"
REPLAY_HEADER = "enricher-replay"


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One consumed input record (what the pipeline needs of a Kafka message)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    replay_id: str | None = None

    @property
    def source(self) -> str:
        """``topic/partition/offset``: unique per input, used as the idempotency key."""
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One record to produce, with the same key as its input."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _headers(record: InputRecord) -> tuple[tuple[str, bytes], ...]:
    source = (SOURCE_HEADER, record.source.encode())
    if record.replay_id is None:
        return (source,)
    return (source, (REPLAY_HEADER, record.replay_id.encode()))


def dead_letter_record(
    record: InputRecord, event: dict[str, Any] | str, error: EventError, topics: TopicSettings
) -> OutputRecord:
    """The dead-letter record of contract section 3."""
    body = {
        "event": event,
        "error": error.as_dict(),
        "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
    }
    return OutputRecord(topics.dead_letter, record.key, _dumps(body), _headers(record))


def output_for(record: InputRecord, outcome: Outcome, topics: TopicSettings) -> OutputRecord | None:
    """The record an outcome produces: output, dead letter, or None for a dropped event."""
    if isinstance(outcome, Enriched):
        return OutputRecord(topics.output, record.key, _dumps(outcome.event), _headers(record))
    if isinstance(outcome, DeadLetter):
        return dead_letter_record(record, outcome.event, outcome.error, topics)
    assert isinstance(outcome, Dropped)
    return None
