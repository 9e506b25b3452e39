"""The serving stores (one contract over memory, Redis and the table), the sink that feeds them,
and the ``serving`` config section."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from faust.types import TP

from enricher.app import create_app
from enricher.config import config_from_dict, parse_config, render_effective
from enricher.errors import ConfigError, ServiceUnavailable
from enricher.records import OutputRecord
from enricher.services import EmbeddedKafka, EmbeddedRedis, find_free_port
from enricher.serving import EnrichmentStore, MemoryEnrichments, Served, ServingSink, replaces
from enricher.serving_redis import RedisEnrichments, served_key
from enricher.serving_table import ChangelogTail, TableEnrichments


def served(offset: int, value: bytes = b"{}", *, partition: int = 1) -> Served:
    return Served("events", partition, offset, value)


class FakeTable:
    """What the serving classes use of a Faust table: its local data, its changelog topic's name
    and partitions, and ``send_changelog``, which here records (partition, key, value) and is
    acknowledged at once."""

    def __init__(self, changelog_topic: str = "changelog", partitions: int = 4) -> None:
        self.data: dict[bytes, bytes] = {}
        self.changelog: list[tuple[int, bytes, bytes]] = []
        self.changelog_topic = SimpleNamespace(get_topic_name=lambda: changelog_topic)
        self.partitions = partitions

    def send_changelog(self, partition: int, key: bytes, value: bytes) -> asyncio.Future[None]:
        self.changelog.append((partition, key, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@pytest.fixture(params=["memory", "redis", "table"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[EnrichmentStore]:
    made: EnrichmentStore
    if request.param == "memory":
        made = MemoryEnrichments()
    elif request.param == "redis":
        service: EmbeddedRedis = request.getfixturevalue("redis_service")
        client = aioredis.Redis.from_url(service.url, socket_timeout=2)
        made = RedisEnrichments(client, app_id=f"t{uuid.uuid4().hex[:8]}", ttl=60)
    else:
        made = TableEnrichments(FakeTable(), owns=lambda topic, partition: True)
    yield made
    await made.close()


async def test_a_store_answers_nothing_for_an_unknown_key(store: EnrichmentStore) -> None:
    assert await store.get(b"nobody") is None


async def test_a_store_keeps_the_output_of_the_latest_input(store: EnrichmentStore) -> None:
    await store.put(b"k", served(5, b'{"n":5}'))
    await store.put(b"k", served(3, b'{"n":3}'))  # an older input (a replay of it): ignored
    assert await store.get(b"k") == served(5, b'{"n":5}')
    await store.put(b"k", served(5, b'{"n":"again"}'))  # the same input re-enriched: replaces
    assert await store.get(b"k") == served(5, b'{"n":"again"}')
    await store.put(b"k", served(9, b'{"n":9}'))
    assert await store.get(b"k") == served(9, b'{"n":9}')


async def test_a_store_keeps_keys_apart_and_any_bytes(store: EnrichmentStore) -> None:
    odd = "user 7/ü{x}".encode()
    await store.put(odd, served(1, b'{"a":1}'))
    await store.put(b"other", served(2, b'{"b":2}'))
    assert await store.get(odd) == served(1, b'{"a":1}')
    assert await store.get(b"other") == served(2, b'{"b":2}')


async def test_another_partition_replaces_whatever_its_offset(store: EnrichmentStore) -> None:
    await store.put(b"k", served(50, partition=1))
    await store.put(b"k", served(2, partition=3))  # the input topic was repartitioned
    assert await store.get(b"k") == served(2, partition=3)


def test_the_rule_and_the_encoding() -> None:
    assert replaces(served(1), None)
    assert replaces(served(2), served(2)) and not replaces(served(1), served(2))
    assert Served.decode(served(7, b"a\nb").encode()) == served(7, b"a\nb")
    assert Served.decode(b"not ours") is None and Served.decode(b"x/y/z\n{}") is None


async def test_redis_entries_expire_and_are_namespaced(redis_service: EmbeddedRedis) -> None:
    client = aioredis.Redis.from_url(redis_service.url, socket_timeout=2)
    store = RedisEnrichments(client, app_id="appx", ttl=30)
    try:
        await store.put(b"k1", served(1))
        key = served_key("appx", b"k1")
        assert key == b"enricher:appx:served:{k1}"
        assert 25_000 < await client.pttl(key) <= 30_000
    finally:
        await client.delete(served_key("appx", b"k1"))
        await store.close()


async def test_redis_stores_of_concurrent_events_share_round_trips(
    redis_service: EmbeddedRedis,
) -> None:
    client = aioredis.Redis.from_url(redis_service.url, socket_timeout=2)
    app_id = f"t{uuid.uuid4().hex[:8]}"
    store = RedisEnrichments(client, app_id=app_id, ttl=30)
    try:
        await client.script_flush()  # the script is loaded again on its first NOSCRIPT
        before = (await client.info("stats"))["total_reads_processed"]
        keys = [f"k{i}".encode() for i in range(50)]
        await asyncio.gather(*(store.put(key, served(i)) for i, key in enumerate(keys)))
        reads = (await client.info("stats"))["total_reads_processed"] - before
        assert [await store.get(key) for key in keys] == [served(i) for i in range(50)]
        assert reads < 10  # a few pipelines (one NOSCRIPT, the load, the retry), not 50 calls
    finally:
        await client.delete(*(served_key(app_id, key) for key in keys))
        await store.close()


async def test_an_unreachable_redis_is_service_unavailable() -> None:
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{find_free_port()}/0", socket_connect_timeout=0.5
    )
    store = RedisEnrichments(client, app_id="a", ttl=30)
    try:
        with pytest.raises(ServiceUnavailable):
            await store.put(b"k", served(1))
        with pytest.raises(ServiceUnavailable):
            await store.get(b"k")
    finally:
        await store.close()


async def test_the_table_writes_the_changelog_to_the_inputs_partition_if_it_owns_it() -> None:
    table = FakeTable()
    owned = {("events", 2)}
    store = TableEnrichments(table, owns=lambda topic, partition: (topic, partition) in owned)
    await store.put(b"k", served(4, b"{}", partition=2))
    await store.put(b"j", served(8, b"{}", partition=3))  # partition moved away: not stored
    assert table.changelog == [(2, b"k", served(4, b"{}", partition=2).encode())]
    assert await store.get(b"j") is None and store.not_owned == 1
    await store.put(b"k", served(1, b"{}", partition=2))  # older: no changelog record either
    assert len(table.changelog) == 1


async def test_the_tail_applies_what_recovery_stopped_short_of(kafka: EmbeddedKafka) -> None:
    """Faust read changelog partition 1 up to offset 3 (a broker under-reporting its end):
    the tail reads on from there, only in the partitions this worker owns."""
    topic = f"changelog-{uuid.uuid4().hex[:8]}"
    bootstrap = kafka.url.split("://", 1)[-1]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for offset in range(6):  # offsets 0..5 in partition 1: key k at input offsets 0..5
            await producer.send_and_wait(topic, served(offset).encode(), key=b"k", partition=1)
        await producer.send_and_wait(topic, served(9).encode(), key=b"other", partition=2)
    finally:
        await producer.stop()
    table = FakeTable(topic)
    store = TableEnrichments(table, owns=lambda topic, partition: True)
    store.apply(b"k", served(3).encode())  # what recovery left: offset 3
    app = SimpleNamespace(
        consumer=SimpleNamespace(
            assignment=lambda: {TP("events", 1), TP(topic, 1)}, topic_partitions=lambda t: 4
        ),
        tables=SimpleNamespace(recovery=SimpleNamespace(active_highwaters={TP(topic, 1): 3})),
    )
    tail = ChangelogTail(
        app, table, store, input_topic="events", client_options={"bootstrap_servers": [bootstrap]}
    )
    await tail()
    assert not tail.ready
    await asyncio.wait_for(tail.wait(), 15)
    assert tail.ready
    assert await store.get(b"k") == served(5)
    assert await store.get(b"other") is None  # partition 2 is not ours
    assert tail.applied == 2  # offsets 4 and 5 (3 was there already)
    assert table.changelog == []  # applied locally, never written back


# --- the sink ------------------------------------------------------------------------------


class RecordingSink:
    def __init__(self, fail: Exception | None = None) -> None:
        self.written: list[OutputRecord] = []
        self.fail = fail

    async def write(self, record: OutputRecord) -> None:
        if self.fail is not None:
            raise self.fail
        self.written.append(record)


class DownStore(MemoryEnrichments):
    async def put(self, key: bytes, served: Served) -> None:
        raise ServiceUnavailable("redis", "down")


def record(topic: str, key: bytes | None, offset: int, value: bytes = b"{}") -> OutputRecord:
    return OutputRecord(topic, key, value, (("enricher-source", f"events/0/{offset}".encode()),))


async def test_the_sink_stores_outputs_once_written_and_nothing_else() -> None:
    inner, store = RecordingSink(), MemoryEnrichments()
    sink = ServingSink(inner, store, output_topic="out")
    await sink.write(record("out", b"k", 3, b'{"x":1}'))
    await sink.write(record("dlq", b"k", 4))  # a dead letter: not an enrichment
    await sink.write(record("out", None, 5))  # no key: nothing to serve it by
    assert len(inner.written) == 3
    assert store.data == {b"k": Served("events", 0, 3, b'{"x":1}')}


async def test_the_sink_stores_nothing_the_broker_refused() -> None:
    store = MemoryEnrichments()
    sink = ServingSink(RecordingSink(fail=OSError("broker gone")), store, output_topic="out")
    with pytest.raises(OSError):
        await sink.write(record("out", b"k", 3))
    assert store.data == {}


async def test_a_store_failure_never_fails_the_event() -> None:
    inner = RecordingSink()
    sink = ServingSink(inner, DownStore(), output_topic="out")
    await sink.write(record("out", b"k", 3))
    assert len(inner.written) == 1 and sink.failures == 1


def test_the_app_registers_the_table_and_its_canonical_url() -> None:
    data: dict[str, Any] = {
        "worker": {"web_host": "0.0.0.0"},
        "serving": {"store": "table", "advertised_host": "w1.internal"},
    }
    app = create_app(config_from_dict(data), web_port=7001)
    assert list(app.faust.tables) == ["enrichments"]
    table = app.faust.tables["enrichments"]
    assert table.changelog_topic.get_topic_name() == "enricher-enrichments-changelog"
    assert str(app.faust.conf.canonical_url) == "http://w1.internal:7001"
    assert list(create_app(config_from_dict({}), web_port=7001).faust.tables) == []


# --- config --------------------------------------------------------------------------------


def test_serving_is_off_by_default_and_round_trips() -> None:
    assert config_from_dict({}).serving.store == "off"
    config = config_from_dict({"serving": {"store": "redis", "redis_ttl": "2h"}})
    assert config.serving.redis_ttl == 7200
    assert parse_config(render_effective(config), env={}) == config


@pytest.mark.parametrize(
    ("serving", "key"),
    [
        ({"store": "tabel"}, "serving.store"),
        ({"store": "redis", "ttl": "1h"}, "serving.ttl"),
        ({"redis_ttl": "0s"}, "serving.redis_ttl"),
        ({"table": "a b"}, "serving.table"),
    ],
)
def test_bad_serving_settings_name_the_key(serving: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"serving": serving})
    assert caught.value.key == key


def test_table_mode_needs_a_reachable_host_for_forwarding() -> None:
    data: dict[str, Any] = {"worker": {"web_host": "0.0.0.0"}, "serving": {"store": "table"}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert caught.value.key == "serving.advertised_host"
    data["serving"]["advertised_host"] = "worker-1.internal"
    assert config_from_dict(data).serving.advertised_host == "worker-1.internal"
