"""Dead-letter redrive: which dead letters to send back through the replay lane, and how.

A dead letter (contract section 3) holds the event (a JSON object, or the raw value as text),
the error and the original input's ``source``. A redriven letter is re-fed with the letter's key
(the input's key), its ``event`` (JSON, or the raw text as it was), the letter's Kafka timestamp,
and ``enricher-origin`` set to the original source, so its new output names the original input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, get_args

from .errors import BadArgument, ErrorKind
from .records import compact_json
from .replay_feed import Refeed
from .replay_scan import ScannedRecord, Window

__all__ = ["LetterFilter", "RedriveSelection", "parse_kinds", "parse_statuses", "refeed_of"]

KINDS: tuple[str, ...] = get_args(ErrorKind)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATUS_RE = re.compile(r"([1-5])(\d\d|xx)", re.IGNORECASE)


def parse_kinds(values: Iterable[str]) -> frozenset[str]:
    """``--kind`` values (repeatable, or comma-separated); empty means any kind."""
    kinds = frozenset(k.strip() for value in values for k in value.split(",") if k.strip())
    for kind in sorted(kinds - set(KINDS)):
        raise BadArgument("--kind", f"unknown error kind {kind!r} (one of {', '.join(KINDS)})")
    return kinds


def parse_statuses(values: Iterable[str]) -> frozenset[str]:
    """``--status`` values: ``503``, or a class like ``5xx``; empty means any status."""
    statuses = frozenset(s.strip().lower() for value in values for s in value.split(",") if s)
    for status in sorted(statuses):
        if not _STATUS_RE.fullmatch(status):
            raise BadArgument(
                "--status", f"expected an HTTP status like 503 or 5xx, got {status!r}"
            )
    return statuses


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """Which dead letters to redrive: any of ``kinds``, any of ``statuses`` (``503``, ``5xx``),
    written (Kafka timestamp) at or after ``since``. Empty sets match everything."""

    kinds: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    since: datetime | None = None

    @property
    def window(self) -> Window:
        return Window(self.since or EPOCH, datetime.now(UTC))

    def matches(self, letter: dict[str, Any]) -> bool:
        error = letter.get("error")
        error = error if isinstance(error, dict) else {}
        if self.kinds and error.get("kind") not in self.kinds:
            return False
        if self.statuses:
            status = error.get("status")
            if not isinstance(status, int) or not self._status_matches(status):
                return False
        return True

    def _status_matches(self, status: int) -> bool:
        return str(status) in self.statuses or f"{status // 100}xx" in self.statuses


def parse_letter(value: bytes | None) -> dict[str, Any] | None:
    """A dead letter's body, None when the record is not one."""
    try:
        letter = json.loads(value or b"")
    except (ValueError, RecursionError):
        return None
    if not isinstance(letter, dict) or "event" not in letter:
        return None
    return letter


def refeed_of(record: ScannedRecord, letter: dict[str, Any]) -> Refeed | None:
    """What to re-feed for one dead letter, None when its event cannot be re-fed."""
    event = letter["event"]
    if isinstance(event, dict):
        value = compact_json(event)
    elif isinstance(event, str):
        value = event.encode("utf-8", errors="surrogatepass")
    else:
        return None
    source = letter.get("source")
    coordinates = _coordinates(source) if isinstance(source, dict) else None
    if coordinates is None:
        return Refeed(record.key, value, record.timestamp_ms, -1, record.coordinates)
    topic, partition, offset = coordinates
    return Refeed(
        record.key, value, record.timestamp_ms, partition, f"{topic}/{partition}/{offset}"
    )


def _coordinates(source: dict[str, Any]) -> tuple[str, int, int] | None:
    topic, partition, offset = source.get("topic"), source.get("partition"), source.get("offset")
    if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
        return topic, partition, offset
    return None


@dataclass(slots=True)
class RedriveSelection:
    """Applies a filter to scanned dead-letter records, counting what it saw."""

    filter: LetterFilter
    letters: int = 0
    selected: int = 0
    unreadable: int = 0  # not a dead letter, or an event that cannot be re-fed
    by_kind: dict[str, int] = field(default_factory=dict)

    def refeeds(self, batch: Iterable[ScannedRecord]) -> list[Refeed]:
        chosen = []
        for record in batch:
            letter = parse_letter(record.value)
            if letter is None:
                self.unreadable += 1
                continue
            self.letters += 1
            if not self.filter.matches(letter):
                continue
            refeed = refeed_of(record, letter)
            if refeed is None:
                self.unreadable += 1
                continue
            error = letter.get("error")
            kind = str(error.get("kind")) if isinstance(error, dict) else "unknown"
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            self.selected += 1
            chosen.append(refeed)
        return chosen
