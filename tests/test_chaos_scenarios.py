"""The fast chaos scenarios (``make chaos`` runs them bigger), on the session's broker and Redis:
hostile input, an output too large for the broker, API faults, secrets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chaos.faults import api_faults, poison
from chaos.scenario import Result
from chaos.secrets import secrets
from chaos.sinks import output_too_large
from chaos.stack import ChaosStack
from enricher.services import EmbeddedKafka, EmbeddedRedis

pytestmark = pytest.mark.integration


@pytest.fixture
async def chaos_stack(
    kafka: EmbeddedKafka, redis_service: EmbeddedRedis
) -> AsyncIterator[ChaosStack]:
    stack = ChaosStack(kafka=kafka, redis=redis_service)
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


def assert_passed(result: Result) -> None:
    failed = [f"{c.name}: {c.detail}" for c in result.checks if not c.ok]
    assert result.passed, f"{result.name}: {failed} {result.error or ''}"


async def test_poison_input_is_dead_lettered_or_safely_encoded(chaos_stack: ChaosStack) -> None:
    result = await poison(chaos_stack, 1.0)
    assert_passed(result)
    assert result.accounting is not None and result.accounting.dead_letters["invalid_event"] > 10


async def test_output_too_large_is_a_dead_letter_and_committed(chaos_stack: ChaosStack) -> None:
    assert_passed(await output_too_large(chaos_stack, 1.0))


async def test_api_faults_end_as_their_dead_letter_kinds(chaos_stack: ChaosStack) -> None:
    result = await api_faults(chaos_stack, 0.15)
    assert_passed(result)
    assert result.accounting is not None
    assert set(result.accounting.dead_letters) == {
        "http_status",
        "timeout",
        "connection",
        "bad_response",
    }


async def test_no_secret_leaks(chaos_stack: ChaosStack) -> None:
    assert_passed(await secrets(chaos_stack, 0.4))
