"""Kafka TLS / SASL_SSL settings and Redis over TLS: validation, masking, the SSL context and the
credentials every client gets, and real round trips through TLS (a TLS proxy in front of Tansu,
redis-server with a TLS port)."""

from __future__ import annotations

import ast
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faust
import pytest
import yaml
from aiokafka import AIOKafkaConsumer

import enricher
from enricher.app import faust_settings
from enricher.config import Config, config_from_dict, render_effective
from enricher.dev import effective_config
from enricher.errors import ConfigError, ServiceUnavailable
from enricher.kafka import ensure_topics, kafka_options, start_producer
from enricher.kafka_security import aiokafka_security, faust_credentials, ssl_context
from enricher.replay_feed import topic_partitions
from enricher.runtime import connect_redis
from enricher.sandbox import SandboxServer

from .harness import WorkerProcess
from .tls import Certificates, ProxiedKafka, TlsProxy, TlsRedis, redis_supports_tls

PASSWORD = "canary-KAFKA-pw-77"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates.create(tmp_path_factory.mktemp("certs"))


def kafka_config(security: dict[str, Any], broker: str = "kafka://127.0.0.1:9092") -> Config:
    return config_from_dict({"kafka": {"broker": broker, "security": security}})


def sasl(**extra: Any) -> dict[str, Any]:
    return {"protocol": "SASL_SSL", "username": "enricher", "password": PASSWORD, **extra}


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("security", "key", "reason"),
    [
        ({"protocol": "SASL_PLAINTEXT", "username": "u", "password": PASSWORD}, "protocol",
         "SASL_PLAINTEXT would send the SASL password in clear; use SASL_SSL"),
        ({"username": "u", "password": PASSWORD}, "username",
         "a SASL setting (would be sent in clear): set protocol: SASL_SSL"),
        ({"protocol": "PLAINTEXT", "password": PASSWORD}, "password",
         "a SASL setting (would be sent in clear): set protocol: SASL_SSL"),
        ({"protocol": "SSL", "sasl_mechanism": "PLAIN"}, "sasl_mechanism",
         "a SASL setting (unused): set protocol: SASL_SSL"),
        ({"protocol": "SASL_SSL", "username": "u"}, "password", "required with protocol SASL_SSL"),
        ({"protocol": "SASL_SSL", "password": PASSWORD}, "username",
         "required with protocol SASL_SSL"),
        ({"protocol": "SSL", "cafile": "/no/such/ca.pem"}, "cafile",
         "file not found or not readable: /no/such/ca.pem"),
        ({"protocol": "SSL", "certfile": "/no/such/cert.pem"}, "certfile",
         "file not found or not readable: /no/such/cert.pem"),
        ({"cafile": __file__}, "cafile", "a TLS option: set protocol: SSL or SASL_SSL"),
        ({"protocol": "SSL", "keyfile": __file__}, "keyfile",
         "needs certfile (the client certificate)"),
        (sasl(sasl_mechanism="GSSAPI"), "sasl_mechanism",
         "must be 'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'"),
        (sasl(pasword="typo"), "pasword", "unknown key"),
    ],
)  # fmt: skip
def test_invalid_security_is_refused_naming_the_key(
    security: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        kafka_config(security)
    assert caught.value.key == f"kafka.security.{key}"
    assert caught.value.message == reason
    assert PASSWORD not in str(caught.value)


def test_check_config_refuses_sasl_in_clear_with_exit_2(tmp_path: Path) -> None:
    security = {"protocol": "SASL_PLAINTEXT", "username": "u", "password": "${KAFKA_PASSWORD}"}
    path = tmp_path / "enricher.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"security": security}}))
    result = _cli("check-config", str(path), env={"KAFKA_PASSWORD": PASSWORD})
    assert result.returncode == 2
    assert "kafka.security.protocol" in result.stderr and "in clear" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_check_config_masks_the_password(tmp_path: Path, certs: Certificates) -> None:
    security = {**sasl(sasl_mechanism="SCRAM-SHA-512"), "cafile": str(certs.cafile)}
    security["password"] = "${KAFKA_PASSWORD}"
    path = tmp_path / "enricher.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"security": security}}))
    result = _cli("check-config", str(path), env={"KAFKA_PASSWORD": PASSWORD})
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    shown = yaml.safe_load(result.stdout)["kafka"]["security"]
    assert shown == {
        "protocol": "SASL_SSL",
        "cafile": str(certs.cafile),
        "check_hostname": True,
        "sasl_mechanism": "SCRAM-SHA-512",
        "username": "enricher",
        "password": "***",
    }


def test_plain_connections_render_as_before() -> None:
    assert "security" not in yaml.safe_load(render_effective(config_from_dict({})))["kafka"]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enricher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


# --- the SSL context and what each client gets ----------------------------------------------------


def test_plaintext_has_no_context_and_no_credentials() -> None:
    security = kafka_config({}).kafka.security
    assert ssl_context(security) is None and faust_credentials(security) is None
    assert aiokafka_security(security) == {"security_protocol": "PLAINTEXT"}


def test_ssl_context_verifies_the_broker_and_presents_the_client_certificate(
    certs: Certificates,
) -> None:
    security = kafka_config(
        {
            "protocol": "SSL",
            "cafile": str(certs.cafile),
            "certfile": str(certs.client_cert),
            "keyfile": str(certs.client_key),
        }
    ).kafka.security
    context = ssl_context(security)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # only the configured CA, not the system's
    credentials = faust_credentials(security)
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.context.verify_mode == ssl.CERT_REQUIRED
    options = aiokafka_security(security)
    assert options["security_protocol"] == "SSL" and isinstance(
        options["ssl_context"], ssl.SSLContext
    )
    assert "sasl_plain_password" not in options


def test_check_hostname_can_be_turned_off(certs: Certificates) -> None:
    security = {"protocol": "SSL", "cafile": str(certs.cafile), "check_hostname": False}
    context = ssl_context(kafka_config(security).kafka.security)
    assert context is not None and not context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED  # the certificate is still verified


def test_sasl_always_goes_with_the_ssl_context(certs: Certificates) -> None:
    security = kafka_config(sasl(sasl_mechanism="SCRAM-SHA-256")).kafka.security
    credentials = faust_credentials(security)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.ssl_context is not None
    assert credentials.mechanism.value == "SCRAM-SHA-256"
    assert PASSWORD not in repr(credentials)
    options = aiokafka_security(security)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "enricher",
        PASSWORD,
    )
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert kafka_config(sasl()).kafka.security.mechanism == "PLAIN"


def test_the_faust_app_and_plain_clients_get_the_same_settings() -> None:
    config = kafka_config(sasl(), broker="kafka://b1:9093;b2:9093")
    credentials = faust_settings(config, web_port=6066)["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials) and credentials.password == PASSWORD
    options = kafka_options(config)
    assert options["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_plain_password"] == PASSWORD


def test_an_unreadable_pem_is_a_config_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        ssl_context(kafka_config({"protocol": "SSL", "cafile": str(garbage)}).kafka.security)
    assert caught.value.key == "kafka.security.cafile"
    with pytest.raises(ConfigError) as caught:
        ssl_context(kafka_config({"protocol": "SSL", "certfile": str(garbage)}).kafka.security)
    assert caught.value.key == "kafka.security.certfile"


def test_every_aiokafka_client_in_the_package_takes_the_security_options() -> None:
    """A guard for new code: each ``AIOKafka*(...)`` call passes ``**kafka_options(config)``
    (or, in enricher/kafka.py, the security mapping it was given)."""
    package = Path(enricher.__file__).parent
    clients = 0
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if not node.func.id.startswith("AIOKafka"):
                continue
            clients += 1
            spread = [k for k in node.keywords if k.arg is None]
            assert spread, f"{path.name}:{node.lineno}: {node.func.id} without security options"
    assert clients >= 7


# --- real round trips ----------------------------------------------------------------------------


@pytest.fixture
async def tls_kafka(certs: Certificates) -> Any:
    """A Tansu broker reachable only through a TLS proxy that requires a client certificate."""
    proxy = TlsProxy(certs.server_context(require_client_cert=True), target_port=0)
    broker = ProxiedKafka(advertised_port=proxy.port)
    proxy.target_port = broker.port
    await proxy.start()
    await broker.astart()
    try:
        yield proxy
    finally:
        await broker.astop()
        await proxy.close()


def mutual_tls(certs: Certificates) -> dict[str, Any]:
    return {
        "protocol": "SSL",
        "cafile": str(certs.cafile),
        "certfile": str(certs.client_cert),
        "keyfile": str(certs.client_key),
    }


@pytest.mark.integration
async def test_kafka_clients_round_trip_over_mutual_tls(
    tls_kafka: TlsProxy, certs: Certificates
) -> None:
    config = kafka_config(mutual_tls(certs), broker=f"kafka://127.0.0.1:{tls_kafka.port}")
    topic = "tls-events"
    await ensure_topics(config, [topic])
    assert await topic_partitions(config, topic) == config.kafka.partitions
    producer = await start_producer(config)
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"event-{i}".encode(), partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, **kafka_options(config), auto_offset_reset="earliest")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10_000, max_records=5)
    finally:
        await consumer.stop()
    values = [record.value for records in batch.values() for record in records]
    assert values == [f"event-{i}".encode() for i in range(5)]
    assert tls_kafka.handshakes >= 3  # every client went through the proxy


@pytest.mark.integration
async def test_a_client_without_its_certificate_is_turned_away(
    tls_kafka: TlsProxy, certs: Certificates
) -> None:
    security = {"protocol": "SSL", "cafile": str(certs.cafile)}
    config = kafka_config(security, broker=f"kafka://127.0.0.1:{tls_kafka.port}")
    with pytest.raises(ServiceUnavailable):
        await start_producer(config)


# --- Redis over TLS ------------------------------------------------------------------------------


@pytest.fixture
async def tls_redis(certs: Certificates) -> Any:
    if not redis_supports_tls():
        pytest.skip("this redis-server was built without TLS")
    server = TlsRedis(certs, require_client_cert=True)
    await server.astart()
    try:
        yield server
    finally:
        await server.astop()


async def _ping(url: str) -> bool:
    redis = connect_redis(config_from_dict({"redis": {"url": url}}))
    try:
        return bool(await redis.ping())
    finally:
        await redis.aclose()


@pytest.mark.integration
async def test_rediss_with_ca_and_client_certificate_from_the_url(
    tls_redis: TlsRedis, certs: Certificates
) -> None:
    url = tls_redis.tls_url(
        ssl_ca_certs=str(certs.cafile),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
    )
    assert await _ping(url)


@pytest.mark.integration
async def test_rediss_refuses_a_server_it_cannot_verify(
    tls_redis: TlsRedis, certs: Certificates
) -> None:
    url = tls_redis.tls_url(  # the system's CAs do not know the test CA
        ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key)
    )
    with pytest.raises(Exception, match="certificate verify failed"):
        await _ping(url)


# --- a worker with both --------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_worker_runs_over_kafka_mutual_tls_and_rediss(
    tmp_path: Path,
    tls_kafka: TlsProxy,
    tls_redis: TlsRedis,
    certs: Certificates,
    sandbox: SandboxServer,
) -> None:
    n = 10
    topics = {"input": "in", "output": "out", "dead_letter": "dlq", "replay": "replay"}
    redis_url = tls_redis.tls_url(
        ssl_ca_certs=str(certs.cafile),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
    )
    data = {
        "app_id": "tls-worker",
        "kafka": {
            "broker": f"kafka://127.0.0.1:{tls_kafka.port}",
            "partitions": 2,
            "rebalance_timeout": "3s",
            "session_timeout": "3s",
            "security": mutual_tls(certs),
        },
        "redis": {"url": redis_url},
        "topics": topics,
        "apis": {"geo": {"url": f"{sandbox.url}/geo/{{ip}}", "rate": "100/s"}},
        "enrichments": [{"api": "geo", "params": {"ip": "ip"}, "into": "geo"}],
    }
    path = tmp_path / "enricher.yaml"
    path.write_text(yaml.safe_dump(data))
    config = config_from_dict(data)
    await ensure_topics(config, topics.values())
    worker = WorkerProcess(path, tmp_path / "worker.log").start()
    try:
        producer = await start_producer(config)
        try:
            for i in range(n):
                await producer.send_and_wait("in", json.dumps({"ip": f"10.3.0.{i}"}).encode())
        finally:
            await producer.stop()
        outputs = await _read(config, "out", n, timeout=60)
    finally:
        worker.kill()
    assert sorted(o["ip"] for o in outputs) == sorted(f"10.3.0.{i}" for i in range(n))
    assert all(o["enrichment"]["geo"]["ip"] == o["ip"] for o in outputs)
    assert sandbox.stats()["calls"] == n


async def _read(config: Config, topic: str, count: int, *, timeout: float) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, **kafka_options(config), auto_offset_reset="earliest")
    await consumer.start()
    found: list[Any] = []
    try:
        give_up = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < give_up:
            batch = await consumer.getmany(timeout_ms=1000)
            found += [json.loads(r.value) for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    return found


def test_the_dev_stack_drops_kafka_security_for_its_plain_embedded_broker() -> None:
    raw = {"kafka": {"broker": "kafka://prod:9093", "partitions": 3, "security": sasl()}}
    data = effective_config(
        raw, kafka_url="kafka://127.0.0.1:1", redis_url="redis://x", api_urls={}
    )
    assert data["kafka"]["broker"] == "kafka://127.0.0.1:1" and data["kafka"]["partitions"] == 3
    assert "security" not in data["kafka"]
