"""Bugs the chaos suite found, pinned by small tests."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError

from enricher.app import FaustSink
from enricher.pipeline import OutputTooLarge, SinkUnavailable
from enricher.records import OutputRecord
from enricher.runtime import http_session
from enricher.sandbox import SandboxSettings, run_sandbox


class _Producer:
    def __init__(self, cause: Exception) -> None:
        self.cause = cause

    async def send_and_wait(self, *args: Any) -> None:
        raise ProducerSendError(f"Error while sending: {self.cause!r}") from self.cause


class _App:
    def __init__(self, cause: Exception) -> None:
        self.producer = _Producer(cause)


def _record() -> OutputRecord:
    return OutputRecord(topic="out", key=None, value=b"{}", headers=())


async def test_an_output_too_large_wrapped_by_faust_is_still_too_large() -> None:
    sink = FaustSink(_App(MessageSizeTooLargeError("too big")))  # type: ignore[arg-type]
    with pytest.raises(OutputTooLarge):
        await sink.write(_record())


async def test_other_send_errors_wrapped_by_faust_are_retried() -> None:
    sink = FaustSink(_App(KafkaConnectionError()))  # type: ignore[arg-type]
    with pytest.raises(SinkUnavailable):
        await sink.write(_record())


async def test_a_dropped_connection_is_not_silently_sent_again() -> None:
    server = await run_sandbox(SandboxSettings())
    try:
        async with http_session() as session:
            async with session.get(f"{server.url}/geo/1.2.3.4") as warm:  # a pooled connection
                await warm.read()
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"{server.url}/fault/reset/x") as response:
                    await response.read()
        assert [c["path"] for c in server.calls()].count("/fault/reset/x") == 1
    finally:
        await server.close()
