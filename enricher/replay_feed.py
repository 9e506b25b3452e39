"""Writing records to the replay topic for a replay registered in Redis.

Each re-fed record keeps its key, value and Kafka timestamp, goes to the same partition number as
the original when the replay topic has it (so one key's events keep their order; else the key
decides), and carries :data:`~enricher.records.REPLAY_HEADER` (the replay id) and
:data:`~enricher.records.ORIGIN_HEADER` (the original input's ``topic/partition/offset``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from .config import Config
from .errors import ServiceUnavailable
from .kafka import create_topics, kafka_options, start_producer
from .kafka_security import aiokafka_security
from .records import ORIGIN_HEADER, REPLAY_HEADER
from .replay import Kind, Replay, ReplayRegistry
from .replay_scan import ScannedRecord, TopicScan, Window
from .runtime import connect_redis

__all__ = [
    "Feeding",
    "Refeed",
    "Source",
    "feed",
    "feed_batch",
    "replay_headers",
    "topic_partitions",
]


@dataclass(frozen=True, slots=True)
class Refeed:
    """One record to write to the replay topic; ``origin`` is the original input's
    ``topic/partition/offset`` and ``partition`` its partition number."""

    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    partition: int
    origin: str

    @classmethod
    def of(cls, record: ScannedRecord) -> Refeed:
        """An input record re-fed as it is."""
        return cls(
            record.key, record.value, record.timestamp_ms, record.partition, record.coordinates
        )


def replay_headers(replay_id: str, origin: str) -> list[tuple[str, bytes]]:
    """The headers of a re-fed record: the replay id and the original input's coordinates."""
    return [(REPLAY_HEADER, replay_id.encode()), (ORIGIN_HEADER, origin.encode())]


async def feed_batch(
    producer: AIOKafkaProducer,
    topic: str,
    partitions: int,
    replay_id: str,
    records: list[Refeed],
) -> None:
    """Write ``records`` to the replay topic and wait until the broker has them all.

    Same key, value and timestamp; the same partition number as the original when the replay
    topic has it (so one key's events keep their order), else the key decides.
    """
    futures = []
    for record in records:
        futures.append(
            await producer.send(
                topic,
                record.value,
                key=record.key,
                partition=record.partition if 0 <= record.partition < partitions else None,
                timestamp_ms=record.timestamp_ms,
                headers=replay_headers(replay_id, record.origin),
            )
        )
    for future in futures:
        await future


async def topic_partitions(config: Config, topic: str) -> int | None:
    """How many partitions ``topic`` has; None when it does not exist (and it is not created)."""
    consumer = AIOKafkaConsumer(**kafka_options(config))
    try:
        await consumer.start()
        if topic not in await consumer.topics():
            return None
        return len(consumer.partitions_for_topic(topic))
    except (KafkaError, OSError) as exc:
        raise ServiceUnavailable(
            "kafka", f"{config.kafka.broker[0]}: {type(exc).__name__}"
        ) from None
    finally:
        await consumer.stop()


@dataclass(slots=True)
class Source:
    """What to re-feed: the records of ``topic`` in ``scan_window`` (all when None), turned into
    re-feeds by ``refeeds``; ``window`` is what the registry shows, ``what`` names them."""

    kind: Kind
    topic: str
    window: Window
    scan_window: Window | None
    refeeds: Callable[[list[ScannedRecord]], list[Refeed]]
    what: str


@dataclass(slots=True)
class Feeding:
    """How far feeding got, for the message after a Ctrl-C."""

    replay_id: str | None = None
    refed: int = 0


async def _replay_topic(config: Config) -> int:
    """Create the replay topic if missing (as many partitions as the input); its partitions."""
    partitions = await topic_partitions(config, config.topics.input) or config.kafka.partitions
    await create_topics(
        config.kafka.broker,
        [config.topics.replay],
        partitions,
        security=aiokafka_security(config.kafka.security),
    )
    return await topic_partitions(config, config.topics.replay) or partitions


async def feed(
    config: Config,
    source: Source,
    share: float,
    selected: int,
    stops: dict[int, int] | None,
    feeding: Feeding,
) -> Replay:
    """Register the replay and write its records to the replay topic; it is then running."""
    partitions = await _replay_topic(config)
    redis = connect_redis(config)
    try:
        registry = ReplayRegistry(redis, config.app_id)
        replay = await registry.create(
            window=source.window, share=share, kind=source.kind, selected=selected
        )
        feeding.replay_id = replay.id
        await registry.set_state(replay.id, "feeding", from_states=("planning",))
        try:
            await _write(config, source, stops, registry, replay.id, partitions, feeding)
        except BaseException:
            await registry.finish_feeding(replay.id, feeding.refed)
            await registry.cancel(replay.id, note=f"feeding stopped after {feeding.refed}")
            raise
        await registry.finish_feeding(replay.id, feeding.refed)
        return await registry.get(replay.id) or replay
    finally:
        await redis.aclose()


async def _write(
    config: Config,
    source: Source,
    stops: dict[int, int] | None,
    registry: ReplayRegistry,
    replay_id: str,
    partitions: int,
    feeding: Feeding,
) -> None:
    producer = await start_producer(config)
    scan = TopicScan(config, source.topic, source.scan_window, stops=stops)
    try:
        async with contextlib.aclosing(scan.batches()) as batches:
            async for batch in batches:
                refeeds = source.refeeds(batch)
                if not refeeds:
                    continue
                await feed_batch(producer, config.topics.replay, partitions, replay_id, refeeds)
                feeding.refed += len(refeeds)
                await registry.add_refed(replay_id, len(refeeds))
                current = await registry.get(replay_id)
                if current is None or current.state == "cancelled":
                    return  # cancelled while feeding: write no more
    finally:
        await producer.stop()
