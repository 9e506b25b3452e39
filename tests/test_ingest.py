"""``enricher ingest`` against the real broker: per-event answers, exactly-once publication of
the valid events (then enriched by a worker), API keys, size limits, and the CLI process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from enricher.config import config_from_dict
from enricher.ingest_web import IngestServer, start_ingest
from enricher.sandbox import geo_answer
from enricher.services import find_free_port

from .harness import PARTITIONS, Stack

SCHEMAS = Path(__file__).resolve().parents[1] / "examples" / "schemas"
KEY = "k-ingest-0123456789"
FILE_KEY = "k-from-file-9876543210"

pytestmark = pytest.mark.integration


def page_view_v1(user: str, ip: str) -> dict[str, Any]:
    return {
        "type": "page_view",
        "schema_version": 1,
        "user_id": user,
        "url": "/home",
        "client": {"ip": ip},
    }


def page_view_v2(user: str, ip: str) -> dict[str, Any]:
    return {
        "type": "page_view",
        "schema_version": 2,
        "user_id": user,
        "page": {"url": "/cart", "referrer": "/home"},
        "client": {"ip": ip, "user_agent": "app/2.0"},
    }


def click(user: str) -> dict[str, Any]:
    return {"type": "click", "schema_version": 1, "user_id": user, "target": "buy"}


def ingest_config(stack: Stack, **ingest: Any) -> dict[str, Any]:
    data = stack.config()
    data["ingest"] = {"schemas": str(SCHEMAS), "api_keys": [KEY], **ingest}
    return data


@pytest.fixture
async def start(stack: Stack) -> AsyncIterator[Callable[..., Awaitable[IngestServer]]]:
    """Start an in-process ingest server with ``ingest_config(stack, **settings)``."""
    servers: list[IngestServer] = []

    async def starter(**settings: Any) -> IngestServer:
        config = config_from_dict(ingest_config(stack, **settings))
        server = await start_ingest(config, base_dir=stack.tmp_path, port=0)
        servers.append(server)
        return server

    yield starter
    for server in servers:
        await server.close()


async def post(
    url: str, body: Any, *, key: str | None = KEY, raw: bytes | None = None, header: str = "bearer"
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers.update(
            {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-Api-Key": key}
        )
    data = raw if raw is not None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/events", data=data, headers=headers) as response,
    ):
        return response.status, await response.json()


async def read_topic(
    stack: Stack, topic: str, expected: int, timeout: float = 30.0
) -> list[tuple[bytes | None, Any, dict[str, bytes]]]:
    """(key, value, headers) of every record of ``topic`` once ``expected`` have arrived, plus
    whatever else arrives within one more second (to catch duplicates)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=stack.kafka_url.split("://", 1)[-1], enable_auto_commit=False
    )
    await consumer.start()
    records: list[tuple[bytes | None, Any, dict[str, bytes]]] = []

    def absorb(batches: dict[Any, list[Any]]) -> None:
        for messages in batches.values():
            for m in messages:
                records.append((m.key, json.loads(m.value), dict(m.headers)))

    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(timeout):
            while len(records) < expected:
                absorb(await consumer.getmany(timeout_ms=200))
        absorb(await consumer.getmany(timeout_ms=1000))
    finally:
        await consumer.stop()
    return records


def statuses(answer: dict[str, Any]) -> list[tuple[int, str, int]]:
    return [(r["index"], r["status"], r["code"]) for r in answer["results"]]


async def test_mixed_batch_gets_per_event_answers_and_valid_events_are_enriched_once(
    stack: Stack, start: Callable[..., Awaitable[IngestServer]]
) -> None:
    clicks = f"clicks-{stack.app_id}"
    server = await start(routes={"click": {"topic": clicks}})
    batch: list[Any] = [
        page_view_v1("u1", "10.0.0.1"),
        page_view_v2("u2", "10.0.0.2"),
        page_view_v1("u3", "10.0.0.300"),  # not an IPv4 address
        {**page_view_v2("u4", "10.0.0.4"), "schema_version": 3},  # no such version
        {"type": "scroll", "schema_version": 1, "user_id": "u5"},  # no such type
        click("u1"),  # routed to its own topic
        42,  # not an object
        {**page_view_v2("u6", "10.0.0.6"), "url": "/old"},  # a v1 field in a v2 event
        {k: v for k, v in page_view_v1("u7", "10.0.0.7").items() if k != "schema_version"},
        page_view_v2("u1", "10.0.0.8"),
    ]
    status, answer = await post(server.url, {"events": batch})

    assert status == 207
    assert (answer["accepted"], answer["rejected"], answer["failed"]) == (4, 6, 0)
    assert statuses(answer) == [
        (0, "accepted", 201),
        (1, "accepted", 201),
        (2, "rejected", 422),
        (3, "rejected", 422),
        (4, "rejected", 422),
        (5, "accepted", 201),
        (6, "rejected", 422),
        (7, "rejected", 422),
        (8, "rejected", 422),
        (9, "accepted", 201),
    ]
    results = answer["results"]
    assert results[2]["path"] == "$.client.ip" and "page_view/v1" in results[2]["reason"]
    assert "version 3" in results[3]["reason"] and "1, 2" in results[3]["reason"]
    assert "'scroll'" in results[4]["reason"]
    assert results[6]["reason"] == "not a JSON object"
    assert "page_view/v2" in results[7]["reason"]
    assert "schema_version" in results[8]["reason"]
    assert results[0]["schema"] == "page_view/v1" and results[1]["schema"] == "page_view/v2"
    assert results[5]["topic"] == clicks
    assert {results[i]["topic"] for i in (0, 1, 9)} == {stack.topics["input"]}

    # exactly once on the topics, keyed by user_id, the value as sent
    records = await read_topic(stack, stack.topics["input"], 3)
    assert sorted((key, value["client"]["ip"]) for key, value, _ in records) == [
        (b"u1", "10.0.0.1"),
        (b"u1", "10.0.0.8"),
        (b"u2", "10.0.0.2"),
    ]
    by_ip = {value["client"]["ip"]: value for _, value, _ in records}
    assert by_ip["10.0.0.1"] == batch[0] and by_ip["10.0.0.2"] == batch[1]
    assert {headers["enricher-schema"] for _, _, headers in records} == {
        b"page_view/v1",
        b"page_view/v2",
    }
    for i in (0, 1, 9):
        stack.produced[results[i]["partition"]] += 1
    assert [(k, v) for k, v, _ in await read_topic(stack, clicks, 1)] == [(b"u1", batch[5])]

    # then enriched by a worker, once each
    stack.start_worker(stack.write_config(ingest_config(stack)))
    collected = await stack.collect(3)
    assert collected.duplicates() == 0 and not collected.dead_letters
    enriched = {out["client"]["ip"]: out for out in collected.outputs}
    assert enriched.keys() == {"10.0.0.1", "10.0.0.2", "10.0.0.8"}
    for ip, out in enriched.items():
        assert out["enrichment"]["geo"] == geo_answer(ip)
    assert enriched["10.0.0.2"]["page"] == batch[1]["page"]


async def test_wrong_or_missing_api_key_is_refused_and_publishes_nothing(
    stack: Stack, start: Callable[..., Awaitable[IngestServer]]
) -> None:
    keys_file = stack.tmp_path / "ingest-keys"
    keys_file.write_text(f"# clients\n\n{FILE_KEY}\n")
    server = await start(api_keys_file="ingest-keys")  # relative to the config's folder
    refused = [
        await post(server.url, [page_view_v1("a", "10.0.1.1")], key=None),
        await post(server.url, [page_view_v1("b", "10.0.1.2")], key="wrong"),
        await post(server.url, [page_view_v1("c", "10.0.1.3")], key=KEY + "x"),
        await post(server.url, [page_view_v1("d", "10.0.1.4")], key="", header="x-api-key"),
    ]
    assert [status for status, _ in refused] == [401] * 4
    assert refused[0][1] == {"error": "missing or wrong API key"}

    ok_bearer = await post(server.url, [page_view_v1("e", "10.0.1.5")])
    ok_header = await post(server.url, [page_view_v2("f", "10.0.1.6")], key=KEY, header="x")
    ok_file = await post(server.url, [click("g")], key=FILE_KEY)
    assert [status for status, _ in (ok_bearer, ok_header, ok_file)] == [200, 200, 200]
    records = await read_topic(stack, stack.topics["input"], 3)
    assert sorted(key or b"" for key, _, _ in records) == [b"e", b"f", b"g"]

    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as got:
        metrics = await got.text()
    assert 'enricher_ingest_requests_total{code="401"} 4.0' in metrics
    assert 'enricher_ingest_requests_total{code="200"} 3.0' in metrics
    assert 'enricher_ingest_events_total{schema="page_view/v1",status="accepted"} 1.0' in metrics
    assert KEY not in metrics and FILE_KEY not in metrics


async def test_oversized_input_is_refused_cleanly(
    stack: Stack, start: Callable[..., Awaitable[IngestServer]]
) -> None:
    server = await start(max_batch_bytes="4KB", max_event_bytes=512, max_batch_events=5)
    big_batch = [page_view_v1(f"u{i}", "10.0.2.1") for i in range(40)]  # > 4000 bytes
    status, answer = await post(server.url, big_batch)
    assert status == 413 and "max_batch_bytes" in answer["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read up to the limit
        yield b"["
        for i in range(40):
            yield json.dumps(page_view_v1(f"c{i}", "10.0.2.2")).encode() + b","
        yield b"1]"

    status, answer = await post(server.url, None, raw=chunks())  # type: ignore[arg-type]
    assert status == 413 and "max_batch_bytes" in answer["error"]

    six = [page_view_v1(f"s{i}", "10.0.2.3") for i in range(6)]
    status, answer = await post(server.url, six)
    assert status == 400 and "max_batch_events" in answer["error"]
    for raw in (b"{not json", b'{"events": 1}', b"NaN", b'{"type": "page_view"}'):
        status, answer = await post(server.url, None, raw=raw)
        assert status == 400, raw

    fat = {**page_view_v1("fat", "10.0.2.4"), "url": "/" + "x" * 600}
    status, answer = await post(server.url, [fat, page_view_v1("thin", "10.0.2.5")])
    assert status == 207
    assert statuses(answer) == [(0, "rejected", 413), (1, "accepted", 201)]
    assert "max_event_bytes" in answer["results"][0]["reason"]

    records = await read_topic(stack, stack.topics["input"], 1)
    assert [key for key, _, _ in records] == [b"thin"]


# --- the command -------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enricher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_cli_serves_until_sigterm(stack: Stack) -> None:
    path = stack.write_config(ingest_config(stack, port=0), name="ingest.yaml")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "enricher",
        "ingest",
        "--config",
        str(path),
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        url = next((w for w in line.split() if w.startswith("http://")), "")
        assert url.endswith("/events"), line
        assert "page_view v1, v2" in line
        base = url.removesuffix("/events")
        status, answer = await post(base, [page_view_v2("cli", "10.0.3.1")])
        assert (status, answer["accepted"]) == (200, 1)
        async with aiohttp.ClientSession() as session, session.get(f"{base}/health") as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    records = await read_topic(stack, stack.topics["input"], 1)
    assert [key for key, _, _ in records] == [b"cli"]


def write_config(tmp_path: Path, ingest: dict[str, Any], broker: str) -> Path:
    path = tmp_path / "enricher.yaml"
    data = {"kafka": {"broker": broker}, "ingest": {"api_keys": [KEY], **ingest}}
    path.write_text(json.dumps(data))
    return path


def test_bad_schema_folder_exits_2_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "schemas" / "page_view").mkdir(parents=True)
    bad = tmp_path / "schemas" / "page_view" / "v1.json"
    bad.write_text('{"type": "object", "required": "user_id"}')  # required must be a list
    closed = f"kafka://127.0.0.1:{find_free_port('127.0.0.1')}"
    result = run_cli("ingest", "--config", str(write_config(tmp_path, {}, closed)))
    assert result.returncode == 2, result.stderr
    assert "ingest.schemas" in result.stderr and str(bad) in result.stderr

    path = write_config(tmp_path, {"schemas": str(SCHEMAS), "api_keys": []}, closed)
    result = run_cli("ingest", "--config", str(path))
    assert result.returncode == 2 and "ingest.api_keys" in result.stderr


def test_unreachable_broker_exits_1(tmp_path: Path) -> None:
    closed = f"kafka://127.0.0.1:{find_free_port('127.0.0.1')}"
    path = write_config(tmp_path, {"schemas": str(SCHEMAS)}, closed)
    result = run_cli("ingest", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert "kafka unavailable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
