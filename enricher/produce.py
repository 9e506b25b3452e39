"""``enricher produce``: publish JSON lines to the input topic."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from .config import Config
from .kafka import ensure_topics, start_producer
from .records import compact_json
from .rules import MISSING, get_path

__all__ = ["key_for", "produce_lines"]


def key_for(event: dict[str, Any], key_field: str | None) -> bytes | None:
    """The Kafka key of an event: the value at ``key_field`` as text, or None."""
    if key_field is None:
        return None
    value = get_path(event, key_field)
    if value is MISSING or value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text.encode()


def _parse_line(line: bytes, number: int) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError as exc:
        print(f"line {number}: not valid JSON ({exc}); skipped", file=sys.stderr)
        return None
    if not isinstance(event, dict):
        print(f"line {number}: not a JSON object; skipped", file=sys.stderr)
        return None
    return event


async def produce_lines(
    config: Config, source: IO[bytes], *, key_field: str | None = None
) -> tuple[int, int]:
    """Send every valid line of ``source``; returns (sent, skipped). Waits for the broker."""
    await ensure_topics(config, [config.topics.input])
    producer = await start_producer(config)
    sent = skipped = 0
    try:
        pending = []
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            event = _parse_line(line, number)
            if event is None:
                skipped += 1
                continue
            value = compact_json(event)
            pending.append(
                await producer.send(config.topics.input, value, key=key_for(event, key_field))
            )
            sent += 1
        for future in pending:
            await future
    finally:
        await producer.stop()
    return sent, skipped
