"""Ingestion without a broker: request bodies, API keys, per-event checks and routing, the
``ingest:`` config, and how broker failures are reported (a producer whose sends fail)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from enricher.apikeys import ApiKeys, load_api_keys, presented_key
from enricher.config import config_from_dict, parse_config, render_effective
from enricher.errors import ConfigError, RefusedBatch, RejectedEvent
from enricher.ingest import Ingestor, Route, event_limit, parse_batch, routes_for
from enricher.schemas import SchemaRegistry

from .test_schemas import EXAMPLES, v1, v2, write

# --- request bodies ---------------------------------------------------------------------------


def test_a_batch_is_an_array_or_an_events_object() -> None:
    assert parse_batch(b'[{"a": 1}, 2]', 10) == [{"a": 1}, 2]
    assert parse_batch(b'{"events": [{"a": 1}]}', 10) == [{"a": 1}]
    assert parse_batch(b"[]", 10) == []


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "not valid JSON"),
        (b"[1,", "not valid JSON"),
        (b"[NaN]", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"a": 1}', "expected a JSON array"),
        (b'{"events": [], "more": 1}', "expected a JSON array"),
        (b'"text"', "expected a JSON array"),
        (b"[1, 2, 3, 4]", "4 events in one batch; ingest.max_batch_events is 3"),
    ],
)
def test_bad_bodies_are_refused_whole(body: bytes, says: str) -> None:
    with pytest.raises(RefusedBatch) as info:
        parse_batch(body, 3)
    assert info.value.code == 400 and says in info.value.message


# --- API keys ---------------------------------------------------------------------------------


def test_keys_from_config_and_file(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# comment\n\n  file-key-1  \nfile-key-2\n")
    settings = parse_config("ingest: {api_keys: [conf-key], api_keys_file: keys}", env={}).ingest
    keys = load_api_keys(settings, tmp_path)
    assert len(keys) == 3 and repr(keys) == "ApiKeys(3 keys)"  # never the keys themselves
    for key in ("conf-key", "file-key-1", "file-key-2"):
        assert keys.accepts(key)
    for wrong in ("", None, "conf-key ", "file-key", "# comment", "conf-keyx"):
        assert not keys.accepts(wrong)


def test_missing_keys_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_api_keys(parse_config("", env={}).ingest, tmp_path)
    assert info.value.key == "ingest.api_keys"
    settings = parse_config("ingest: {api_keys_file: nope}", env={}).ingest
    with pytest.raises(ConfigError) as info:
        load_api_keys(settings, tmp_path)
    assert info.value.key == "ingest.api_keys_file" and str(tmp_path / "nope") in str(info.value)
    with pytest.raises(ConfigError, match="spaces"):
        load_api_keys(parse_config("ingest: {api_keys: ['a b']}", env={}).ingest, tmp_path)


def test_the_key_comes_from_bearer_or_x_api_key() -> None:
    assert presented_key({"Authorization": "Bearer k1"}) == "k1"
    assert presented_key({"Authorization": "bearer  k1 "}) == "k1"
    assert presented_key({"X-Api-Key": "k2"}) == "k2"
    assert presented_key({"Authorization": "Basic abc", "X-Api-Key": "k3"}) == "k3"
    assert presented_key({}) is None and presented_key({"Authorization": "Bearer "}) is None
    assert not ApiKeys([]).accepts("anything")


# --- the ingest: config -----------------------------------------------------------------------

SECRET = "ingest-s3cr3t-key"


def test_config_defaults_masking_and_round_trip() -> None:
    config = parse_config(
        "ingest: {api_keys: ['${K}'], routes: {click: {topic: clicks}}, max_batch_bytes: 1MiB}",
        env={"K": SECRET},
    )
    ingest = config.ingest
    assert (ingest.host, ingest.port, ingest.schemas) == ("127.0.0.1", 0, "schemas")
    assert (ingest.type_field, ingest.version_field, ingest.key_field) == (
        "type",
        "schema_version",
        "user_id",
    )
    assert (ingest.max_batch_events, ingest.max_event_bytes, ingest.ack_timeout) == (
        1000,
        None,  # the workers' limit
        10.0,
    )
    assert event_limit(config) == config.worker.max_event_bytes == 1_048_576
    smaller = parse_config(
        "worker: {max_event_bytes: 2MiB}\ningest: {max_batch_bytes: 1KB}", env={}
    )
    assert event_limit(smaller) == 1000  # KB = 1000 bytes
    assert event_limit(parse_config("ingest: {max_event_bytes: 10KB}", env={})) == 10_000
    rendered = render_effective(config)
    assert SECRET not in rendered and "'***'" in rendered
    reparsed = parse_config(rendered, env={})
    assert reparsed.ingest.api_keys == ("***",) and reparsed.ingest.routes == ingest.routes
    assert parse_config(render_effective(parse_config("", env={})), env={}) == parse_config(
        "", env={}
    )


@pytest.mark.parametrize(
    ("ingest", "key"),
    [
        ({"colour": 1}, "ingest.colour"),
        ({"routes": {"click": {"topic": "events.enriched"}}}, "ingest.routes.click.topic"),
        ({"routes": {"click": {"partition": 1}}}, "ingest.routes.click.partition"),
        ({"max_event_bytes": "2MiB"}, "ingest.max_event_bytes"),
        ({"max_batch_bytes": "1KB", "max_event_bytes": "2KB"}, "ingest.max_event_bytes"),
        ({"key_field": "a..b"}, "ingest.key_field"),
        ({"port": 70000}, "ingest.port"),
    ],
)
def test_bad_ingest_config_names_the_key(ingest: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"ingest": ingest})
    assert info.value.key == key


def test_secret_keys_do_not_leak_into_errors() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"ingest": {"api_keys": [{"k": SECRET}]}})
    assert SECRET not in str(info.value)


def test_routes_name_known_types_and_default_to_the_input_topic() -> None:
    registry = SchemaRegistry.load(EXAMPLES)
    config = config_from_dict(
        {"ingest": {"key_field": "user_id", "routes": {"click": {"topic": "clicks"}}}}
    )
    routes = routes_for(config, registry)
    assert routes["click"] == Route("clicks", "user_id")
    assert routes["page_view"] == Route("events", "user_id")
    bad = config_from_dict({"ingest": {"routes": {"scroll": {"topic": "s"}}}})
    with pytest.raises(ConfigError) as info:
        routes_for(bad, registry)
    assert info.value.key == "ingest.routes.scroll"


# --- one event, and publishing ----------------------------------------------------------------


class Meta:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset


class FakeProducer:
    """Sends succeed, fail at once, fail later or never finish, by the event's user_id."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        *,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        behaviour = json.loads(value)["user_id"]
        if behaviour == "refuse":
            raise KafkaConnectionError()
        self.sent.append((topic, value, key))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if behaviour == "fail":
            future.set_exception(KafkaTimeoutError())
        elif behaviour != "hang":
            future.set_result(Meta(topic, 1, len(self.sent) - 1))
        return future


def ingestor(producer: FakeProducer, registry: SchemaRegistry | None = None) -> Ingestor:
    registry = registry or SchemaRegistry.load(EXAMPLES)
    routes = {name: Route("events", "user_id") for name in registry.versions}
    return Ingestor(
        registry=registry, routes=routes, producer=producer, max_event_bytes=400, ack_timeout=0.5
    )


async def test_broker_failures_are_reported_failed_never_accepted() -> None:
    producer = FakeProducer()
    batch = [v1(user_id="ok1"), v2(user_id="refuse"), v1(user_id="fail"), v2(user_id="hang")]
    outcomes = await ingestor(producer).ingest([*batch, v2(user_id="ok2"), 7])
    assert [(o.status, o.code) for o in outcomes] == [
        ("accepted", 201),
        ("failed", 503),
        ("failed", 503),
        ("failed", 504),
        ("accepted", 201),
        ("rejected", 422),
    ]
    assert outcomes[3].reason is not None and "may still be written" in outcomes[3].reason
    assert outcomes[4].as_dict() == {
        "index": 4,
        "status": "accepted",
        "code": 201,
        "schema": "page_view/v2",
        "topic": "events",
        "partition": 1,
        "offset": 3,
    }
    # sent in batch order, compact JSON, keyed by user_id
    assert [key for _, _, key in producer.sent] == [b"ok1", b"fail", b"hang", b"ok2"]
    assert json.loads(producer.sent[0][1]) == batch[0] and b", " not in producer.sent[0][1]


async def test_too_large_and_keyless_events_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(RejectedEvent) as info:
        ingestor(FakeProducer()).prepare(0, v1(url="/" + "x" * 400))
    assert info.value.code == 413 and "over ingest.max_event_bytes (400B)" in info.value.reason
    loose = SchemaRegistry.load(write(tmp_path, {"t/v1.json": {"type": "object"}}))
    for event in (
        {"type": "t", "schema_version": 1},
        {"type": "t", "schema_version": 1, "user_id": None},
    ):
        with pytest.raises(RejectedEvent) as info:
            ingestor(FakeProducer(), loose).prepare(0, event)
        assert (
            info.value.path == "$.user_id" and "'user_id' is missing or null" in info.value.reason
        )
    keyed = ingestor(FakeProducer(), loose).prepare(
        3, {"type": "t", "schema_version": 1, "user_id": 42}
    )
    assert (keyed.index, keyed.key, keyed.topic, str(keyed.schema)) == (3, b"42", "events", "t/v1")
