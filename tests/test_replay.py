"""Replays against the embedded broker and Redis: the registry, the scan, the CLI's re-feeding.

The worker side (consuming the replay topic) is not exercised here: a test plays the workers by
calling ``record_outcome`` where it needs one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from enricher.config import Config, config_from_dict
from enricher.kafka import create_topics
from enricher.replay import CACHE_SECONDS, REPLAY_TTL, ReplayRegistry
from enricher.replay_scan import TopicScan, Window
from enricher.services import EmbeddedKafka, EmbeddedRedis

pytestmark = pytest.mark.integration

PARTITIONS = 4
HOUR_MS = 3_600_000
Produced = tuple[int, bytes | None, bytes, int]  # partition, key, value, timestamp (ms)


@dataclass
class Env:
    """One test's topics, app id and config on the shared broker and Redis."""

    kafka: EmbeddedKafka
    redis_url: str
    tmp_path: Path
    suffix: str

    @property
    def topics(self) -> dict[str, str]:
        names = ("input", "output", "dead_letter", "replay")
        return {name: f"{name.replace('_', '')}-{self.suffix}" for name in names}

    @property
    def app_id(self) -> str:
        return f"rp{self.suffix}"

    def data(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "kafka": {"broker": self.kafka.url, "partitions": PARTITIONS},
            "redis": {"url": self.redis_url},
            "topics": self.topics,
            "apis": {"geo": {"url": "http://127.0.0.1:1/geo/{ip}", "rate": "10/s"}},
            "enrichments": [
                {"when": {"type": "page_view"}, "api": "geo", "params": {"ip": "ip"}, "into": "g"}
            ],
        }

    @property
    def config(self) -> Config:
        return config_from_dict(self.data())

    def config_file(self) -> Path:
        path = self.tmp_path / "enricher.yaml"
        path.write_text(yaml.safe_dump(self.data()))
        return path

    async def produce(
        self, topic: str, records: list[tuple[int, bytes | None, bytes, int]]
    ) -> None:
        """(partition, key, value, timestamp_ms) records, in a few batches per partition."""
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = []
            for partition, key, value, ts in records:
                futures.append(
                    await producer.send(topic, value, key=key, partition=partition, timestamp_ms=ts)
                )
            for future in futures:
                await future
        finally:
            await producer.stop()

    async def read_all(self, topic: str) -> list[Any]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap, enable_auto_commit=False
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            if not tps:
                return []
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            messages: list[Any] = []
            idle = 0
            while idle < 3:
                batch = await consumer.getmany(timeout_ms=300)
                idle = 0 if batch else idle + 1
                for found in batch.values():
                    messages += found
            return messages
        finally:
            await consumer.stop()


@pytest.fixture
async def env(
    tmp_path: Path, kafka: EmbeddedKafka, redis_service: EmbeddedRedis
) -> AsyncIterator[Env]:
    test_env = Env(kafka, redis_service.url, tmp_path, uuid.uuid4().hex[:8])
    await create_topics(kafka.url, test_env.topics.values(), PARTITIONS)
    yield test_env


@pytest.fixture
async def redis_client(redis_service: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_service.url)
    try:
        yield client
    finally:
        await client.aclose()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enricher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def window_records(base: int) -> tuple[list[tuple[int, bytes | None, bytes, int]], set[bytes]]:
    """200 records over 4 partitions with shuffled (non-monotonic) timestamps in base..base+200s;
    the window [base+50s, base+150s) holds exactly the returned values."""
    rng = random.Random(7)
    stamps = [base + i * 1000 for i in range(200)]
    rng.shuffle(stamps)
    records, inside = [], set()
    for i, ts in enumerate(stamps):
        value = json.dumps({"type": "page_view", "ip": f"10.0.0.{i % 7}", "n": i}).encode()
        records.append((i % PARTITIONS, f"k{i % 9}".encode(), value, ts))
        if base + 50_000 <= ts < base + 150_000:
            inside.add(value)
    return records, inside


# --- the registry ---------------------------------------------------------------------------


async def test_registry_lifecycle_ttls_and_completion(redis_client: aioredis.Redis) -> None:
    app_id = f"app{uuid.uuid4().hex[:6]}"
    registry = ReplayRegistry(redis_client, app_id)
    window = Window(datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC))
    replay = await registry.create(window=window, share=0.4, selected=3, note="n")
    assert replay.id.startswith("r") and replay.state == "planning" and replay.selected == 3
    key = registry.key(replay.id)
    assert key == f"enricher:{{{app_id}}}:replay:{replay.id}"
    assert registry.index_key == f"enricher:{{{app_id}}}:replays"
    assert REPLAY_TTL - 5 < await redis_client.ttl(key) <= REPLAY_TTL
    assert REPLAY_TTL - 5 < await redis_client.ttl(registry.index_key) <= REPLAY_TTL

    await redis_client.expire(key, 100)
    assert await registry.set_state(replay.id, "feeding", from_states=("planning",)) == "feeding"
    assert await redis_client.ttl(key) > 100  # renewed by the update
    await registry.add_refed(replay.id, 3)
    # outcomes that arrive while feeding never close the replay...
    assert await registry.record_outcome(replay.id, "outputs") == 1
    assert await registry.record_outcome(replay.id, "dead_letters", 2) == 3
    assert (await registry.get(replay.id)).state == "feeding"  # type: ignore[union-attr]
    # ...the end of feeding does, when they are all in
    assert await registry.finish_feeding(replay.id, 3) == "done"
    done = await registry.get(replay.id)
    assert done is not None and done.finished == 3 and done.refed == 3
    assert (done.outputs, done.dead_letters) == (1, 2)
    assert (done.start, done.end, done.share, done.note) == (window.start, window.end, 0.4, "n")
    assert await redis_client.hget(key, "finished_at") is not None
    assert await registry.cancel(replay.id) == "done"  # too late to cancel

    held = await registry.create(window=window, share=0.5, note="first")
    await registry.finish_feeding(held.id, 5)
    note = "quota geo/day: the replay's share is spent"
    assert await registry.set_state(held.id, "held", note=note, from_states=["running"]) == "held"
    assert (await registry.get(held.id)).note == note  # type: ignore[union-attr]
    assert await registry.set_state(held.id, "running", from_states=["held"]) == "running"
    assert (await registry.get(held.id)).note == note  # type: ignore[union-attr]
    await registry.set_state(held.id, "running", note="", from_states=["running"])
    assert (await registry.get(held.id)).note == ""  # type: ignore[union-attr]
    await redis_client.delete(registry.key(held.id))

    second = await registry.create(window=window, share=1.0, kind="redrive")
    await registry.finish_feeding(second.id, 2)
    assert await registry.record_outcome(second.id, "dropped") == 1
    assert (await registry.get(second.id)).state == "running"  # type: ignore[union-attr]
    assert await registry.record_outcome(second.id, "cancelled_events") == 2
    assert (await registry.get(second.id)).state == "done"  # type: ignore[union-attr]

    assert [r.id for r in await registry.list()] == [second.id, replay.id]  # newest first
    await redis_client.delete(registry.key(replay.id))
    assert [r.id for r in await registry.list()] == [second.id]  # pruned
    assert await registry.get("r20000101T000000-000000") is None
    assert await registry.cancel("r20000101T000000-000000") is None
    assert await registry.record_outcome("r20000101T000000-000000", "outputs") == -1
    assert not await redis_client.exists(registry.key("r20000101T000000-000000"))
    with pytest.raises(ValueError):
        await registry.record_outcome(second.id, "bogus")  # type: ignore[arg-type]


async def test_cancel_is_seen_by_workers_within_cache_seconds(
    redis_client: aioredis.Redis,
) -> None:
    app_id = f"app{uuid.uuid4().hex[:6]}"
    now = [100.0]
    worker = ReplayRegistry(redis_client, app_id, clock=lambda: now[0])
    admin = ReplayRegistry(redis_client, app_id)
    window = Window(datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC))
    replay = await admin.create(window=window, share=0.25)
    await admin.finish_feeding(replay.id, 10)

    assert await worker.is_cancelled(replay.id) is False
    lane = await worker.lane(replay.id)
    assert lane is not None and lane.share == 0.25 and lane.replay_id == replay.id
    assert await admin.cancel(replay.id) == "cancelled"
    now[0] += CACHE_SECONDS * 0.8
    assert await worker.is_cancelled(replay.id) is False  # cached: no Redis round trip
    now[0] += CACHE_SECONDS * 0.4
    assert await worker.is_cancelled(replay.id) is True
    await redis_client.delete(admin.key(replay.id))
    now[0] += 10
    assert await worker.is_cancelled(replay.id) is True  # cancelled is for good
    # many concurrent checks of a stale entry make one refresh and agree
    other = await admin.create(window=window, share=0.5)
    answers = await asyncio.gather(*(worker.is_cancelled(other.id) for _ in range(50)))
    assert answers == [False] * 50
    unknown = "r20000101T000000-000000"
    assert await worker.is_cancelled(unknown) is True and await worker.lane(unknown) is None


# --- the scan -------------------------------------------------------------------------------


async def test_scan_selects_exactly_the_window_across_partitions(env: Env) -> None:
    base = int(time.time() * 1000) - HOUR_MS
    records, inside = window_records(base)
    await env.produce(env.topics["input"], records)
    window = Window(
        datetime.fromtimestamp((base + 50_000) / 1000, UTC),
        datetime.fromtimestamp((base + 150_000) / 1000, UTC),
    )
    scan = TopicScan(env.config, env.topics["input"], window)
    got = [r async for batch in scan.batches() for r in batch]
    assert sorted(r.value for r in got) == sorted(inside) and len(got) == 100
    assert scan.stats.read == 200 and scan.stats.selected == 100
    assert scan.stats.partitions == PARTITIONS and sum(scan.stats.stops.values()) == 200
    assert all(window.start_ms <= r.timestamp_ms < window.end_ms for r in got)
    for partition in range(PARTITIONS):  # offsets in order within each partition
        offsets = [r.offset for r in got if r.partition == partition]
        assert offsets == sorted(offsets)

    # records written after a scan are not part of a second scan bounded by its stops
    late = [(0, b"late", b'{"type": "page_view", "ip": "1"}', base + 60_000)]
    await env.produce(env.topics["input"], late)
    again = TopicScan(env.config, env.topics["input"], window, stops=scan.stats.stops)
    assert sorted(r.value for b in [x async for x in again.batches()] for r in b) == sorted(inside)
    fresh = TopicScan(env.config, env.topics["input"], window)
    assert len([r async for batch in fresh.batches() for r in batch]) == 101

    missing = TopicScan(env.config, f"missing-{env.suffix}", window)
    assert [b async for b in missing.batches()] == [] and missing.stats.partitions == 0


# --- the CLI --------------------------------------------------------------------------------


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"redis": {"url": "redis://127.0.0.1:1/0"}}))
    bad = run_cli("replay", "--config", str(path), "--from", "yesterday")
    assert bad.returncode == 2 and "--from" in bad.stderr
    no_yes = run_cli("replay", "--config", str(path), "--from", "-2h")
    assert no_yes.returncode == 2 and "--yes" in no_yes.stderr
    share = run_cli("replay", "--config", str(path), "--from", "-2h", "--share", "0")
    assert share.returncode == 2 and "--share" in share.stderr
    kind = run_cli("dlq", "redrive", "--config", str(path), "--kind", "nope", "--yes")
    assert kind.returncode == 2 and "--kind" in kind.stderr
    status = run_cli("replay", "status", "--config", str(path), "not-an-id")
    assert status.returncode == 2 and "ID" in status.stderr


async def test_replay_yes_detach_refeeds_exactly_the_window(env: Env) -> None:
    base = int(time.time() * 1000) - HOUR_MS
    records, inside = window_records(base)
    await env.produce(env.topics["input"], records)
    originals = {
        m.value: m for m in await env.read_all(env.topics["input"])
    }  # value -> original message
    path = str(env.config_file())
    start, end = iso(base + 50_000), iso(base + 150_000)

    dry = await asyncio.to_thread(
        run_cli, "replay", "--config", path, "--from", start, "--to", end, "--dry-run", "--json"
    )
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["events"] == 100 and plan["apis"][0]["calls_needed"] == 100  # no cache
    assert await env.read_all(env.topics["replay"]) == []  # a dry run changes nothing

    result = await asyncio.to_thread(
        run_cli, "replay", "--config", path, "--from", start, "--to", end, "--yes", "--detach"
    )
    assert result.returncode == 0, result.stderr
    replay_id = result.stdout.strip().splitlines()[-1]
    assert replay_id.startswith("r") and "replay status" in result.stderr

    replayed = await env.read_all(env.topics["replay"])
    assert sorted(m.value for m in replayed) == sorted(inside) and len(replayed) == 100
    for message in replayed:
        original = originals[message.value]
        headers = dict(message.headers)
        assert headers["enricher-replay"] == replay_id.encode()
        origin = f"{original.topic}/{original.partition}/{original.offset}"
        assert headers["enricher-origin"] == origin.encode()
        assert message.key == original.key and message.timestamp == original.timestamp
        assert message.partition == original.partition

    redis = aioredis.Redis.from_url(env.redis_url)
    try:
        replay = await ReplayRegistry(redis, env.app_id).get(replay_id)
    finally:
        await redis.aclose()
    assert replay is not None and replay.state == "running" and replay.kind == "replay"
    assert (replay.selected, replay.refed, replay.share) == (100, 100, 0.5)

    status = await asyncio.to_thread(run_cli, "replay", "--config", path, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert [r["id"] for r in json.loads(status.stdout)["replays"]] == [replay_id]
    one = await asyncio.to_thread(run_cli, "replay", "status", replay_id, "--config", path)
    assert one.returncode == 0 and "running" in one.stdout and "re-fed 100" in one.stdout
    cancel = await asyncio.to_thread(run_cli, "replay", "cancel", replay_id, "--config", path)
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout


async def test_replay_watches_until_every_outcome_is_in(env: Env) -> None:
    base = int(time.time() * 1000) - HOUR_MS
    await env.produce(
        env.topics["input"],
        [(i % PARTITIONS, None, b'{"type": "x"}', base + i) for i in range(6)],
    )
    args = ["replay", "--config", str(env.config_file()), "--from", iso(base), "--yes"]
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "enricher", *args, "--share", "0.2"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    redis = aioredis.Redis.from_url(env.redis_url)
    try:
        registry = ReplayRegistry(redis, env.app_id)
        async with asyncio.timeout(20):
            while not (found := await registry.list()) or found[0].state != "running":  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        replay = found[0]
        assert replay.share == 0.2 and replay.selected == 6
        for kind in ("outputs", "outputs", "dead_letters", "dropped", "outputs", "outputs"):
            await registry.record_outcome(replay.id, kind)  # type: ignore[arg-type]
        async with asyncio.timeout(20):
            stdout, stderr = await proc.communicate()
    finally:
        await redis.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 0, err
    assert out.splitlines()[0] == replay.id
    assert f"replay {replay.id} done" in out and "outputs 4" in out and "dropped 1" in out


async def test_redrive_refeeds_matching_letters_with_origin_headers(env: Env) -> None:
    now = int(time.time() * 1000)
    old, recent = now - 5 * HOUR_MS, now - HOUR_MS

    def letter(kind: str, status: int | None, event: Any, offset: int) -> bytes:
        error = {"kind": kind, "message": "m", "api": "geo", "status": status, "attempts": 3}
        source = {"topic": env.topics["input"], "partition": offset % PARTITIONS, "offset": offset}
        return json.dumps({"event": event, "error": error, "source": source}).encode()

    letters = [
        (0, b"k0", letter("http_status", 503, {"type": "page_view", "n": 0}, 10), recent),
        (1, b"k1", letter("http_status", 404, {"type": "page_view", "n": 1}, 11), recent),
        (2, b"k2", letter("timeout", None, {"type": "page_view", "n": 2}, 12), recent),
        (3, b"k3", letter("http_status", 502, {"type": "page_view", "n": 3}, 13), old),
        (0, b"k4", letter("invalid_event", None, "{not json", 14), recent),
        (1, b"k5", b"not a dead letter", recent),
    ]
    await env.produce(env.topics["dead_letter"], letters)
    path = str(env.config_file())

    result = await asyncio.to_thread(
        run_cli,
        *("dlq", "redrive", "--config", path, "--kind", "http_status", "--status", "5xx"),
        *("--since", "-3h", "--yes", "--detach"),
    )
    assert result.returncode == 0, result.stderr
    replay_id = result.stdout.strip().splitlines()[-1]
    replayed = await env.read_all(env.topics["replay"])
    assert len(replayed) == 1  # 503 and recent; 404 is not 5xx, 502 is too old
    (message,) = replayed
    assert json.loads(message.value) == {"type": "page_view", "n": 0} and message.key == b"k0"
    headers = dict(message.headers)
    assert headers["enricher-replay"] == replay_id.encode()
    assert headers["enricher-origin"] == f"{env.topics['input']}/2/10".encode()
    assert message.partition == 2  # the original input's partition

    raw = await asyncio.to_thread(
        run_cli, "dlq", "redrive", "--config", path, "--kind", "invalid_event", "-y", "--detach"
    )
    assert raw.returncode == 0, raw.stderr
    second = raw.stdout.strip().splitlines()[-1]
    texts = [m.value for m in await env.read_all(env.topics["replay"]) if m.value != message.value]
    assert texts == [b"{not json"]

    redis = aioredis.Redis.from_url(env.redis_url)
    try:
        registry = ReplayRegistry(redis, env.app_id)
        first = await registry.get(replay_id)
        assert first is not None and first.kind == "redrive" and first.selected == 1
        again = await registry.get(second)
        assert again is not None and again.selected == 1
    finally:
        await redis.aclose()
