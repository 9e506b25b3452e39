"""The pipeline without a broker: bounded fan-out, per-key order, in-order acks, nothing lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from enricher.config import Config, config_from_dict
from enricher.enrich import Enricher
from enricher.errors import CallError, ShuttingDown
from enricher.pipeline import OutputTooLarge, Pipeline, SinkUnavailable
from enricher.records import InputRecord, OutputRecord

CONFIG: dict[str, Any] = {
    "apis": {"geo": {"url": "http://127.0.0.1:1/geo/{ip}", "rate": "100/s"}},
    "enrichments": [
        {"when": {"type": "page_view"}, "api": "geo", "params": {"ip": "ip"}, "into": "geo"}
    ],
}


class ScriptedClient:
    """An API client whose answers the test releases one by one."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.running = 0
        self.max_running = 0

    def gate(self, ip: str) -> asyncio.Event:
        return self.gates.setdefault(ip, asyncio.Event())

    async def call(self, api: str, params: Mapping[str, Any], lane: Any = None) -> Any:
        ip = str(params["ip"])
        self.calls.append(ip)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gate(ip).wait()
        finally:
            self.running -= 1
        if ip in self.fail:
            raise CallError("http_status", "HTTP 503", api=api, status=503, attempts=5)
        return {"country": f"C-{ip}"}


class MemorySink:
    def __init__(self) -> None:
        self.records: list[OutputRecord] = []
        self.failures_left = 0
        self.too_large: set[bytes] = set()

    async def write(self, record: OutputRecord) -> None:
        await asyncio.sleep(0)
        if self.failures_left:
            self.failures_left -= 1
            raise SinkUnavailable("broker down")
        if record.topic == "events.enriched" and json.loads(record.value).get("ip") in {
            x.decode() for x in self.too_large
        }:
            raise OutputTooLarge("too large")
        self.records.append(record)


def make(
    client: ScriptedClient, sink: MemorySink, *, in_flight: int = 8
) -> tuple[Pipeline[int], list[int], Config]:
    config = config_from_dict(CONFIG)
    acked: list[int] = []

    async def release(token: int) -> None:
        acked.append(token)

    pipeline: Pipeline[int] = Pipeline(
        enricher=Enricher(config, client),
        sink=sink,
        topics=config.topics,
        in_flight=in_flight,
        release=release,
        write_retry_delay=0.001,
    )
    return pipeline, acked, config


def rec(offset: int, ip: str, key: str | None = None, partition: int = 0) -> InputRecord:
    value = json.dumps({"type": "page_view", "ip": ip, "n": offset}).encode()
    return InputRecord("events", partition, offset, key.encode() if key else None, value)


async def until(predicate: Any, timeout: float = 2.0) -> None:
    """Let the pipeline's tasks run until ``predicate`` holds (they only need loop turns)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the tasks signal nothing we could await
            await asyncio.sleep(0.001)


async def test_acks_and_writes_wait_for_slow_offset_zero() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, acked, _ = make(client, sink)
    for offset in range(4):
        await pipeline.submit(rec(offset, f"ip{offset}"), offset)
    for offset in (1, 2, 3):
        client.gate(f"ip{offset}").set()
    await until(lambda: client.running == 1)
    await asyncio.sleep(0.01)
    # offset 0 still in flight: nothing past it is written (it could not be committed) or acked
    assert sink.records == [] and acked == []
    client.gate("ip0").set()
    await until(lambda: len(acked) == 4)
    assert acked == [0, 1, 2, 3]
    assert [json.loads(r.value)["ip"] for r in sink.records] == ["ip0", "ip1", "ip2", "ip3"]


async def test_other_partitions_are_written_past_a_slow_one() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, acked, _ = make(client, sink)
    await pipeline.submit(rec(0, "slow", partition=0), 0)
    await pipeline.submit(rec(0, "fast", partition=1), 1)
    client.gate("fast").set()
    await until(lambda: acked == [1])
    assert [json.loads(r.value)["ip"] for r in sink.records] == ["fast"]


async def test_same_key_emits_in_input_order_while_others_overlap() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, acked, _ = make(client, sink)
    await pipeline.submit(rec(0, "a1", key="A"), 0)
    await pipeline.submit(rec(1, "a2", key="A"), 1)
    await pipeline.submit(rec(2, "b1", key="B"), 2)
    await until(lambda: client.calls == ["a1", "b1"])  # a2 waits for a1
    client.gate("a2").set()
    client.gate("b1").set()
    await until(lambda: client.running == 1)  # b1 enriched, its write waits for offsets 0, 1
    client.gate("a1").set()
    await until(lambda: len(acked) == 3)
    order = [json.loads(r.value)["ip"] for r in sink.records]
    assert order == ["a1", "a2", "b1"]  # one partition: written in offset order
    assert acked == [0, 1, 2]


async def test_in_flight_bound_blocks_submit() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, _, _ = make(client, sink, in_flight=3)
    for offset in range(3):
        await pipeline.submit(rec(offset, f"ip{offset}"), offset)
    blocked = asyncio.create_task(pipeline.submit(rec(3, "ip3"), 3))
    await asyncio.sleep(0.01)
    assert not blocked.done() and client.max_running == 3
    client.gate("ip0").set()
    await asyncio.wait_for(blocked, 1)


async def test_failures_become_dead_letters_with_source_and_headers() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, acked, _ = make(client, sink)
    client.fail.add("bad")
    client.gate("bad").set()
    await pipeline.submit(InputRecord("events", 0, 0, b"k", b"{not json"), 0)
    await pipeline.submit(rec(1, "bad", key="k"), 1)
    await pipeline.submit(
        InputRecord("events", 0, 2, None, json.dumps({"type": "page_view"}).encode()), 2
    )
    await until(lambda: len(acked) == 3)
    by_offset = {json.loads(r.value)["source"]["offset"]: r for r in sink.records}
    assert {r.topic for r in sink.records} == {"events.dlq"}
    first = json.loads(by_offset[0].value)
    assert first["event"] == "{not json" and first["error"]["kind"] == "invalid_event"
    assert by_offset[0].key == b"k"
    assert dict(by_offset[0].headers) == {"enricher-source": b"events/0/0"}
    second = json.loads(by_offset[1].value)["error"]
    assert second == {
        "kind": "http_status",
        "message": "HTTP 503",
        "api": "geo",
        "status": 503,
        "attempts": 5,
    }
    third = json.loads(by_offset[2].value)["error"]
    assert third["kind"] == "invalid_event" and "ip" in third["message"]
    assert pipeline.stats.dead_letters_by_kind == {"invalid_event": 2, "http_status": 1}


async def test_sink_outage_is_retried_and_too_large_output_dead_lettered() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, acked, _ = make(client, sink)
    sink.failures_left = 3
    sink.too_large.add(b"big")
    client.gate("ok").set()
    client.gate("big").set()
    await pipeline.submit(rec(0, "ok"), 0)
    await pipeline.submit(rec(1, "big"), 1)
    await until(lambda: len(acked) == 2)
    topics = sorted((r.topic, json.loads(r.value).get("ip")) for r in sink.records)
    assert topics == [("events.dlq", None), ("events.enriched", "ok")]


async def test_close_abandons_waiting_events_unacked_and_stops_submits() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, acked, _ = make(client, sink)
    await pipeline.submit(rec(0, "done"), 0)
    await pipeline.submit(rec(1, "stuck"), 1)
    client.gate("done").set()
    await until(lambda: acked == [0])
    await pipeline.close(grace=0.05)
    assert acked == [0]
    assert pipeline.stats.abandoned == 1
    with pytest.raises(ShuttingDown):
        await pipeline.submit(rec(2, "late"), 2)


async def test_revoke_acks_what_finishes_in_time_and_abandons_the_rest_unwritten() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, acked, _ = make(client, sink)
    await pipeline.submit(rec(0, "quick", partition=1), 0)
    await pipeline.submit(rec(1, "stuck", partition=1), 1)
    await pipeline.submit(rec(2, "done-late", partition=1), 2)
    await pipeline.submit(rec(0, "kept", partition=2), 3)
    client.gate("done-late").set()  # enriched, but its write waits for offset 1
    revoking = asyncio.create_task(pipeline.revoke([("events", 1)], wait=0.2))
    client.gate("quick").set()
    await asyncio.wait_for(revoking, 2)
    assert acked == [0]  # finished within the wait: acked before the commit that follows
    assert [json.loads(r.value)["ip"] for r in sink.records] == ["quick"]  # nothing else written
    client.gate("stuck").set()
    client.gate("kept").set()
    await until(lambda: acked == [0, 3])  # the partition kept goes on
    # a record read before the revocation is dropped once it gets a slot
    assert not await pipeline.submit(rec(3, "stale", partition=1), 4, lambda: False)
    assert pipeline.tracker.in_flight() == 0


async def test_close_lets_a_begun_write_finish_and_ack() -> None:
    client, sink = ScriptedClient(), MemorySink()
    pipeline, acked, _ = make(client, sink)
    sink.failures_left = 30  # the broker is briefly away: the write is retried
    client.gate("x").set()
    await pipeline.submit(rec(0, "x"), 0)
    await until(lambda: sink.failures_left < 30)
    await pipeline.close(grace=0.0)
    assert acked == [0] and len(sink.records) == 1
