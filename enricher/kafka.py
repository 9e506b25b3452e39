"""Plain aiokafka helpers for the commands and services that talk to Kafka without a Faust app.

Every client is built with :func:`kafka_options`: the bootstrap servers and the same TLS / SASL
settings the worker's Faust app uses (:mod:`enricher.kafka_security`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from .config import Config
from .errors import ServiceUnavailable
from .kafka_security import aiokafka_security

__all__ = ["create_topics", "ensure_topics", "kafka_bootstrap", "kafka_options", "start_producer"]

_TOPIC_ALREADY_EXISTS = 36


def kafka_bootstrap(broker: str | Sequence[str]) -> list[str]:
    """``host:port`` strings from Faust-style URLs (``kafka://h:p``, ``;``/``,``-separated)."""
    urls = [broker] if isinstance(broker, str) else list(broker)
    parts = (p.strip() for url in urls for p in url.replace(",", ";").split(";"))
    return [p.removeprefix("kafka://").rstrip("/") for p in parts if p]


def kafka_options(config: Config) -> dict[str, Any]:
    """Keyword arguments every aiokafka client of ``config`` takes: servers and security."""
    return {
        "bootstrap_servers": kafka_bootstrap(config.kafka.broker),
        **aiokafka_security(config.kafka.security),
    }


async def create_topics(
    broker_url: str | Sequence[str],
    names: Iterable[str],
    partitions: int,
    *,
    replication: int = 1,
    security: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names actually created.

    Tansu auto-creates an unknown topic, with 4 partitions, on the first Metadata request that
    names it; an existing topic keeps its partition count whatever ``partitions`` says.
    aiokafka reports "already exists" in the response (code 36) rather than raising.
    ``security``: TLS / SASL keyword arguments (see :mod:`enricher.kafka_security`).
    """
    topics = [NewTopic(name, partitions, replication) for name in dict.fromkeys(names)]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap(broker_url), **(security or {}))
    try:
        await admin.start()
        response = await admin.create_topics(topics)
    except (KafkaError, OSError) as exc:
        raise ServiceUnavailable("kafka", f"cannot create topics: {type(exc).__name__}") from None
    finally:
        await admin.close()
    created = []
    for error in response.topic_errors:
        name, code = error[0], error[1]
        if code == 0:
            created.append(name)
        elif code != _TOPIC_ALREADY_EXISTS:
            raise ServiceUnavailable("kafka", f"cannot create topic {name!r}: error code {code}")
    return created


async def ensure_topics(config: Config, names: Iterable[str]) -> None:
    """Create the config's topics that do not exist yet, with ``kafka.partitions`` partitions."""
    await create_topics(
        config.kafka.broker,
        names,
        config.kafka.partitions,
        security=aiokafka_security(config.kafka.security),
    )


async def start_producer(config: Config) -> AIOKafkaProducer:
    """A started producer that waits for all replicas (``acks=all``)."""
    producer = AIOKafkaProducer(**kafka_options(config), acks="all")
    try:
        await producer.start()
    except (KafkaError, OSError) as exc:
        await producer.stop()
        raise ServiceUnavailable(
            "kafka", f"{config.kafka.broker[0]}: {type(exc).__name__}"
        ) from None
    return producer
