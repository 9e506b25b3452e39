"""Plain aiokafka helpers for the CLI commands that talk to Kafka without a Faust app."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from .config import Config
from .errors import ServiceUnavailable

__all__ = ["bootstrap_servers", "ensure_topics", "start_producer"]


def bootstrap_servers(config: Config) -> list[str]:
    """``host:port`` of every configured broker URL (``kafka://host:port``)."""
    return [url.split("://", 1)[-1].rstrip("/") for url in config.kafka.broker]


async def ensure_topics(config: Config, names: Iterable[str]) -> None:
    """Create the topics that do not exist yet, with ``kafka.partitions`` partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(config))
    try:
        await admin.start()
    except (KafkaConnectionError, OSError) as exc:
        raise ServiceUnavailable(
            "kafka", f"{config.kafka.broker[0]}: {type(exc).__name__}"
        ) from None
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if missing:
            new = [NewTopic(n, config.kafka.partitions, 1) for n in missing]
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile elsewhere
                await admin.create_topics(new)
    finally:
        await admin.close()


async def start_producer(config: Config) -> AIOKafkaProducer:
    """A started producer that waits for all replicas (``acks=all``)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(config), acks="all")
    try:
        await producer.start()
    except (KafkaError, OSError) as exc:
        await producer.stop()
        raise ServiceUnavailable(
            "kafka", f"{config.kafka.broker[0]}: {type(exc).__name__}"
        ) from None
    return producer
