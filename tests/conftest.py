"""Shared fixtures: a private Kafka-compatible broker and Redis for the session, a sandbox API and
a per-test :class:`Stack` (own topics, consumer group and Redis key namespace)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from enricher.sandbox import SandboxServer, SandboxSettings, run_sandbox
from enricher.services import EmbeddedKafka, EmbeddedRedis

from .harness import Stack


@pytest.fixture(scope="session")
def kafka() -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def redis_service() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    server = await run_sandbox(SandboxSettings(), host="127.0.0.1", port=0)
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def stack(
    tmp_path: Path, kafka: EmbeddedKafka, redis_service: EmbeddedRedis, sandbox: SandboxServer
) -> AsyncIterator[Stack]:
    test_stack = Stack(
        tmp_path, kafka_url=kafka.url, redis_url=redis_service.url, api_url=sandbox.url
    )
    await test_stack.create_topics()
    try:
        yield test_stack
    finally:
        test_stack.stop_all()
