"""Reading a topic's records by Kafka timestamp: the time window, and the scan itself.

The scan reads every partition from the first offset that may hold the window (the answer of
``offsets_for_times`` when plausible; Tansu ignores the timestamp, so there it is the beginning)
to the partition's end *as it was when the scan began*, and keeps the records whose timestamp is
in the window. Timestamps are not monotonic in Kafka, so a record past the window never stops a
partition early. ``end_offsets()`` under-reports on Tansu (the last batch's base + 1), so the end
is the larger of it and the high-water mark of the first fetch response; records written later
are live traffic and are left alone. Counts are of what was actually read.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from .config import Config
from .errors import BadArgument, ServiceUnavailable
from .kafka import kafka_options
from .units import parse_duration

__all__ = ["ScanStats", "ScannedRecord", "TopicScan", "Window", "parse_time", "parse_window"]

_POLL_MS = 200
_MAX_RECORDS = 2000
_IDLE_POLLS = 10  # polls without a high-water mark before an empty-looking partition counts as done


_TIME_HELP = "ISO-8601 (2025-01-31T12:00:00Z; no zone = UTC) or relative (-2h, -30m, -1d, now)"


def parse_time(value: str, *, now: datetime, option: str = "--from") -> datetime:
    """An aware UTC datetime from ISO-8601 or ``-2h``/``-30m``/``-1d``/``now`` (from ``now``)."""
    text_value = value.strip()
    try:
        if text_value.lower() == "now":
            return now
        if text_value.startswith("-"):
            return now - timedelta(seconds=parse_duration(text_value[1:]))
        moment = datetime.fromisoformat(text_value)
    except (ValueError, OverflowError):
        raise BadArgument(option, f"expected {_TIME_HELP}, got {value!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Window:
    """Kafka record timestamps in ``[start, end)``."""

    start: datetime
    end: datetime

    @property
    def start_ms(self) -> int:
        return round(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        return round(self.end.timestamp() * 1000)

    def __contains__(self, timestamp_ms: object) -> bool:
        return isinstance(timestamp_ms, int) and self.start_ms <= timestamp_ms < self.end_ms

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"


def parse_window(start: str, end: str | None, *, now: datetime | None = None) -> Window:
    """``--from`` and ``--to`` (default now). A ``--to`` in the future is taken as now: records
    written after the replay starts are live traffic, not part of it."""
    moment = now or datetime.now(UTC)
    window = Window(
        parse_time(start, now=moment, option="--from"),
        min(parse_time(end or "now", now=moment, option="--to"), moment),
    )
    if window.start >= window.end:
        raise BadArgument("--from", f"the window {window} is empty: --from must be before --to")
    return window


@dataclass(frozen=True, slots=True)
class ScannedRecord:
    """One record read by a scan."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(slots=True)
class ScanStats:
    """What a scan read: ``stops`` holds each partition's end offset (exclusive), so a second
    scan given them reads exactly the same records."""

    partitions: int = 0
    read: int = 0
    selected: int = 0
    stops: dict[int, int] = field(default_factory=dict)


class TopicScan:
    """One pass over ``topic``: ``async for batch in scan.batches()`` yields the selected records
    (all of them when ``window`` is None), partition order kept; ``stats`` counts as it goes."""

    def __init__(
        self,
        config: Config,
        topic: str,
        window: Window | None,
        *,
        stops: Mapping[int, int] | None = None,
    ) -> None:
        self.config = config
        self.topic = topic
        self.window = window
        self.stats = ScanStats()
        self._given_stops = dict(stops) if stops is not None else None

    async def batches(self) -> AsyncGenerator[list[ScannedRecord], None]:
        consumer = AIOKafkaConsumer(
            **kafka_options(self.config),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        try:
            await consumer.start()
            # a Metadata request naming an unknown topic would create it on Tansu: list them all
            if self.topic not in await consumer.topics():
                return
            tps = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic)]
            self.stats.partitions = len(tps)
            consumer.assign(tps)
            ends = await self._start(consumer, tps)
            async for batch in self._read(consumer, tps, ends):
                yield batch
        except (KafkaError, OSError) as exc:
            raise ServiceUnavailable(
                "kafka", f"scanning {self.topic}: {type(exc).__name__}"
            ) from None
        finally:
            await consumer.stop()

    async def _start(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Seek every partition; the end offsets reported now (possibly too low on Tansu)."""
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        firsts: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
        found: dict[TopicPartition, Any] = {}
        if self.window is not None:
            try:
                found = await consumer.offsets_for_times(dict.fromkeys(tps, self.window.start_ms))
            except KafkaError:
                found = {}  # not supported: read from the beginning
        for tp in tps:
            answer = found.get(tp)
            offset = answer.offset if answer is not None else -1
            consumer.seek(tp, offset if firsts[tp] <= offset <= ends[tp] else firsts[tp])
        return ends

    async def _read(
        self,
        consumer: AIOKafkaConsumer,
        tps: list[TopicPartition],
        reported: dict[TopicPartition, int],
    ) -> AsyncIterator[list[ScannedRecord]]:
        given = self._given_stops
        stops: dict[TopicPartition, int | None] = {
            tp: given.get(tp.partition, 0) if given is not None else None for tp in tps
        }
        active = list(tps)
        idle = dict.fromkeys(tps, 0)
        while active:
            fetched = await consumer.getmany(*active, timeout_ms=_POLL_MS, max_records=_MAX_RECORDS)
            batch: list[ScannedRecord] = []
            for tp in list(active):
                messages = fetched.get(tp, [])
                stop = stops[tp]
                if stop is None and (high := consumer.highwater(tp)) is not None:
                    stop = stops[tp] = max(reported[tp], high)
                self.stats.read += sum(1 for m in messages if stop is None or m.offset < stop)
                batch += [self._record(m) for m in messages if self._wanted(m, stop)]
                idle[tp] = 0 if messages else idle[tp] + 1
                position = await consumer.position(tp)
                if stop is None and idle[tp] >= _IDLE_POLLS and position >= reported[tp]:
                    stop = stops[tp] = position
                if stop is not None and position >= stop:
                    active.remove(tp)
                    consumer.pause(tp)
            self.stats.selected += len(batch)
            if batch:
                yield batch
        self.stats.stops = {tp.partition: stop or 0 for tp, stop in stops.items()}

    def _wanted(self, message: Any, stop: int | None) -> bool:
        if stop is not None and message.offset >= stop:
            return False
        return self.window is None or message.timestamp in self.window

    def _record(self, message: Any) -> ScannedRecord:
        return ScannedRecord(
            message.topic,
            message.partition,
            message.offset,
            message.timestamp,
            message.key,
            message.value,
        )
