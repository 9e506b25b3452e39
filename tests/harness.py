"""Integration-test harness: real worker processes against the embedded broker, Redis and API.

Each test gets its own topics and ``app_id`` (hence its own consumer group and Redis keys), so
one broker and one Redis serve the whole session.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from enricher.kafka import create_topics, kafka_bootstrap
from enricher.services import run_enricher, spawn_child

PARTITIONS = 4


@dataclass
class Collected:
    """Everything the workers wrote, keyed by input source (``topic/partition/offset``)."""

    outputs: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    keys: dict[str, bytes | None] = field(default_factory=dict)
    headers: dict[str, dict[str, bytes]] = field(default_factory=dict)
    replayed: Counter[str] = field(default_factory=Counter)  # replay id -> records
    replay_outputs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # source, body
    times: list[int] = field(default_factory=list)  # Kafka timestamps (ms) of live outputs
    replay_times: list[int] = field(default_factory=list)  # ... and of replayed ones

    @property
    def total(self) -> int:
        return len(self.outputs) + len(self.dead_letters)

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.sources.values() if n > 1)


class WorkerProcess:
    """One ``enricher worker`` subprocess with its log in a file."""

    def __init__(self, config_path: Path, log_path: Path, extra_args: Sequence[str] = ()) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "enricher", "worker", "--config", str(self.config_path)]
        # cwd: Faust writes its <app_id>-data dir there
        self.proc = spawn_child(
            [*command, *self.extra_args], log_path=self.log_path, cwd=self.log_path.parent
        )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL if it does not stop in time)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"worker did not stop within {timeout}s; log: {self.log_path}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Stack:
    """One test's view of the shared services, plus helpers to drive and observe workers."""

    def __init__(self, tmp_path: Path, *, kafka_url: str, redis_url: str, api_url: str) -> None:
        self.tmp_path = tmp_path
        self.kafka_url = kafka_url
        self.redis_url = redis_url
        self.api_url = api_url
        suffix = uuid.uuid4().hex[:8]
        self.app_id = f"t{suffix}"
        self.topics = {
            "input": f"in-{suffix}",
            "output": f"out-{suffix}",
            "dead_letter": f"dlq-{suffix}",
            "replay": f"replay-{suffix}",
        }
        self.workers: list[WorkerProcess] = []
        self.produced: dict[int, int] = defaultdict(int)  # partition -> records produced
        self.sent: list[tuple[int, int]] = []  # (partition, offset) in production order

    def config(self, **api_overrides: Any) -> dict[str, Any]:
        """A config for this test: one API ``geo`` on the sandbox; override its settings."""
        api = {
            "url": f"{self.api_url}/geo/{{ip}}",
            "rate": "200/s",
            "burst": 20,
            "timeout": "2s",
            "concurrency": 32,
            "retry": {"attempts": 5, "backoff": "50ms..500ms"},
        }
        api.update(api_overrides)
        return {
            "app_id": self.app_id,
            "kafka": {
                "broker": self.kafka_url,
                "partitions": PARTITIONS,
                # Tansu keeps a departed member until its session expires: short = fast restarts
                "rebalance_timeout": "3s",
                "session_timeout": "3s",
            },
            "redis": {"url": self.redis_url},
            "topics": dict(self.topics),
            "worker": {"in_flight": 64},
            "apis": {"geo": api},
            "enrichments": [
                {
                    "when": {"type": "page_view"},
                    "api": "geo",
                    "params": {"ip": "client.ip"},
                    "into": "geo",
                }
            ],
            "unmatched": "passthrough",
        }

    def write_config(self, data: dict[str, Any], name: str = "enricher.yaml") -> Path:
        path = self.tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def start_worker(self, config_path: Path, extra_args: Sequence[str] = ()) -> WorkerProcess:
        """Start ``enricher worker --config config_path *extra_args`` (``--web-port N``...)."""
        n = len(self.workers)
        log_path = self.tmp_path / f"worker{n}.log"
        worker = WorkerProcess(config_path, log_path, extra_args).start()
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.kill()

    async def create_topics(self) -> None:
        await create_topics(self.kafka_url, self.topics.values(), PARTITIONS)

    async def produce(
        self, events: Sequence[tuple[str | None, Any]], *, partition: int | None = None
    ) -> None:
        """Send (key, value) pairs; dict values are JSON-encoded, bytes sent as they are."""
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap(self.kafka_url), acks="all")
        await producer.start()
        try:
            futures = []
            for key, value in events:
                raw = value if isinstance(value, bytes) else json.dumps(value).encode()
                futures.append(
                    await producer.send(
                        self.topics["input"],
                        raw,
                        key=key.encode() if key else None,
                        partition=partition,
                    )
                )
            for future in futures:
                meta = await future
                self.produced[meta.partition] += 1
                self.sent.append((meta.partition, meta.offset))
        finally:
            await producer.stop()

    async def collect(self, expected: int, timeout: float = 60.0) -> Collected:
        """Everything written once ``expected`` inputs have records and the group has committed
        every produced offset; then one more second of reading to catch duplicates."""

        async def done(c: Collected) -> bool:
            return len(c.sources) >= expected and await self.all_committed()

        return await self._read(done, timeout, linger=1.0, what=f"{expected} inputs")

    async def collect_at_least(self, expected: int, timeout: float = 60.0) -> Collected:
        """Everything written once ``expected`` live records have arrived; then one more
        second of reading to show no more are coming."""

        async def done(c: Collected) -> bool:
            return c.total >= expected

        return await self._read(done, timeout, linger=1.0, what=f"{expected} records")

    async def collect_replayed(
        self, replay_id: str, expected: int, timeout: float = 60.0
    ) -> Collected:
        """Everything written once ``expected`` records of the replay have arrived."""

        async def done(c: Collected) -> bool:
            return c.replayed[replay_id] >= expected

        return await self._read(done, timeout, linger=0.5, what=f"{expected} replayed records")

    async def _read(
        self, done: Callable[[Collected], Awaitable[bool]], timeout: float, linger: float, what: str
    ) -> Collected:
        """Read the output and dead-letter topics from the start until ``done``."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_bootstrap(self.kafka_url), enable_auto_commit=False
        )
        await consumer.start()
        collected = Collected()
        try:
            tps = self._output_partitions()
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            async with asyncio.timeout(timeout):
                while not await done(collected):
                    self._absorb(collected, await consumer.getmany(timeout_ms=200))
            self._absorb(collected, await consumer.getmany(timeout_ms=int(linger * 1000)))
        except TimeoutError:
            raise AssertionError(
                f"waited {timeout}s for {what}: got {collected.total} records "
                f"({dict(collected.replayed)} replayed); committed={await self.committed()} "
                f"produced={dict(self.produced)}"
            ) from None
        finally:
            await consumer.stop()
        return collected

    def _absorb(self, collected: Collected, batches: dict[Any, list[Any]]) -> None:
        for tp, messages in batches.items():
            for message in messages:
                body = json.loads(message.value)
                headers = {k: v for k, v in message.headers}
                source = headers["enricher-source"].decode()
                if "enricher-replay" in headers:  # re-fed: counted apart from live records
                    collected.replayed[headers["enricher-replay"].decode()] += 1
                    if tp.topic == self.topics["output"]:
                        collected.replay_outputs.append((source, body))
                        collected.replay_times.append(message.timestamp)
                    continue
                collected.sources[source] += 1
                collected.keys[source] = message.key
                collected.headers[source] = headers
                if tp.topic == self.topics["output"]:
                    collected.outputs.append(body)
                    collected.times.append(message.timestamp)
                else:
                    collected.dead_letters.append(body)

    async def committed(self) -> dict[int, int]:
        """The group's committed offset per input partition (absent when none).

        Asked through a non-subscribing consumer of the group: aiokafka's admin client cannot
        decode Tansu's OffsetFetch reply."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_bootstrap(self.kafka_url),
            group_id=self.app_id,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            found = {
                p: await consumer.committed(TopicPartition(self.topics["input"], p))
                for p in range(PARTITIONS)
            }
        finally:
            await consumer.stop()
        return {p: offset for p, offset in found.items() if offset is not None and offset >= 0}

    async def wait_committed(self, expected: dict[int, int], timeout: float = 10.0) -> None:
        """Wait until the group's committed offsets are exactly ``expected``."""
        async with asyncio.timeout(timeout):
            while await self.committed() != expected:  # noqa: ASYNC110 - polls the broker
                await asyncio.sleep(0.2)

    async def all_committed(self) -> bool:
        committed = await self.committed()
        return all(committed.get(p, 0) >= n for p, n in self.produced.items())

    async def enricher(self, *args: str) -> str:
        """Run an ``enricher`` command (without blocking the loop the sandbox API runs on);
        returns its stdout, failing the test on a non-zero exit."""
        code, out, err = await run_enricher(*args, timeout=180.0)  # pytest-timeout's bound
        assert code == 0, f"enricher {' '.join(args)}: {err}"
        return out

    async def wait_for_members(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the consumer group is stable with ``count`` members (workers joined)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap(self.kafka_url))
        await admin.start()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    groups = await admin.describe_consumer_groups([self.app_id])
                    group = groups[0].groups[0] if groups and groups[0].groups else None
                    if group and group[2] == "Stable" and len(group[5]) == count:
                        return
                    await asyncio.sleep(0.25)
        finally:
            await admin.close()

    def _output_partitions(self) -> list[TopicPartition]:
        return [
            TopicPartition(self.topics[t], p)
            for t in ("output", "dead_letter")
            for p in range(PARTITIONS)
        ]
