"""The stack a chaos scenario runs on, and one scenario's own topics, workers, traffic and tail.

:class:`ChaosStack` starts, on free loopback ports, a Tansu broker and Redis (the ``services.py``
children the tests, ``enricher dev`` and the bench use) and the sandbox API in a thread of its own
with its own event loop (so the scenario's producer and tail do not delay the calls it times).
:class:`Scene` is one scenario: its own ``app_id`` (consumer group, Redis keys) and topics, worker
subprocesses it can kill, stop and restart, a paced producer that remembers every offset it got,
and a tail of the output and dead-letter topics that records what came out for each input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from bench.proc import rss_mb
from bench.stack import say
from enricher.kafka import create_topics
from enricher.sandbox import SandboxServer, SandboxSettings, run_sandbox
from enricher.services import EmbeddedKafka, EmbeddedRedis, spawn_child, stop_child

from .checker import Seen

__all__ = ["ChaosStack", "Scene", "Worker", "say"]

PARTITIONS = 4
T = TypeVar("T")


class SandboxThread:
    """The sandbox API served by its own event loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: SandboxServer | None = None

    def start(self, settings: SandboxSettings) -> SandboxServer:
        self._thread.start()
        self.server = self.run(run_sandbox(settings))
        return self.server

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the sandbox's loop (its state is not thread-safe)."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class ChaosStack:
    """Tansu, Redis and the sandbox API, shared by the scenarios (each resets what it uses)."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        kafka: EmbeddedKafka | None = None,
        redis: EmbeddedRedis | None = None,
    ) -> None:
        """``kafka`` and ``redis``: running services to use (and leave running) instead of
        starting our own (the tests pass the session's)."""
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="enricher-chaos-"))
        self.kafka = kafka or EmbeddedKafka()
        self.redis = redis or EmbeddedRedis()
        self._owns_kafka, self._owns_redis = kafka is None, redis is None
        self.sandbox = SandboxThread()

    @property
    def api_url(self) -> str:
        assert self.sandbox.server is not None, "start() first"
        return self.sandbox.server.url

    async def start(self) -> None:
        await self.kafka.astart()
        await self.redis.astart()
        await asyncio.to_thread(self.sandbox.start, SandboxSettings(hang=30.0))

    async def stop(self, *, keep_workdir: bool = False) -> None:
        try:
            await asyncio.to_thread(self.sandbox.stop)
        finally:
            if self._owns_kafka:
                await asyncio.to_thread(self.kafka.close)
            if self._owns_redis:
                await asyncio.to_thread(self.redis.close)
            if not keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def api_calls(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The sandbox's call log (``time``, raw ``path``, ``host``) from ``since`` on."""
        server = self.sandbox.server
        assert server is not None
        return [c for c in self.sandbox.call(server.calls) if c["time"] >= since]

    def api_update(self, **changes: Any) -> None:
        server = self.sandbox.server
        assert server is not None
        self.sandbox.call(lambda: server.update(**changes))


class Worker:
    """One ``enricher worker`` subprocess (its own process group), its log and peak RSS."""

    def __init__(self, command: list[str], log_path: Path, cwd: Path) -> None:
        self.command, self.log_path, self.cwd = command, log_path, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_mb = 0.0
        self.stopped_by_us = False  # killed or terminated on purpose (not a crash)

    def start(self) -> Worker:
        self.proc = spawn_child(self.command, log_path=self.log_path, cwd=self.cwd)
        return self

    @property
    def crashed(self) -> bool:
        """Exited without being told to."""
        return not self.stopped_by_us and self.proc is not None and self.proc.poll() is not None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample_rss(self) -> None:
        if self.proc is not None and self.alive:
            self.peak_rss_mb = max(self.peak_rss_mb, rss_mb(self.proc.pid) or 0.0)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        self.stopped_by_us = True
        if self.proc is not None and self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    async def terminate(self, timeout: float) -> float:
        """SIGTERM; seconds until it exited (``inf``: still running after ``timeout``, killed)."""
        assert self.proc is not None
        started, self.stopped_by_us = time.monotonic(), True
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return float("inf")
        return time.monotonic() - started

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_child(self.proc, 10.0)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Scene:
    """One scenario's topics, consumer group, config, workers, produced offsets and tail."""

    def __init__(
        self,
        stack: ChaosStack,
        name: str,
        *,
        redis_url: str | None = None,
        kafka: EmbeddedKafka | None = None,
    ) -> None:
        """``kafka``: a broker of the scenario's own instead of the stack's."""
        self.stack, self.name = stack, name
        self.kafka = kafka or stack.kafka
        suffix = uuid.uuid4().hex[:8]
        self.app_id = f"chaos-{name}-{suffix}"
        self.dir = stack.workdir / self.app_id
        self.dir.mkdir(parents=True)
        self.topics = {k: f"{k}-{suffix}" for k in ("input", "output", "dead_letter", "replay")}
        self.redis_url = redis_url or stack.redis.url
        self.config_path = self.dir / "enricher.yaml"
        self.workers: list[Worker] = []
        self.produced: list[str] = []  # topic/partition/offset, in the order acknowledged
        self.seen: dict[str, Seen] = {}
        self.arrivals: list[tuple[float, str]] = []  # (when read, source) of every record
        self.raw: list[bytes] = []  # every output and dead-letter value (when keep_raw)
        self.keep_raw = False
        self.started = time.time()
        self.env: dict[str, str] = {}
        self._producer: AIOKafkaProducer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def config(
        self,
        apis: dict[str, dict[str, Any]],
        rules: list[dict[str, Any]],
        *,
        worker: dict[str, Any] | None = None,
    ) -> Path:
        """Write the scenario's config: ``apis`` (URLs relative to the sandbox), ``rules`` and
        ``worker`` settings (default: ``in_flight`` 64). Redis comes from the environment."""
        for api in apis.values():
            api["url"] = self.stack.api_url + api["url"]
        data = {
            "app_id": self.app_id,
            "kafka": {
                "broker": self.kafka.url,
                "partitions": PARTITIONS,
                "rebalance_timeout": "3s",
                "session_timeout": "3s",
            },
            "redis": {"url": "${CHAOS_REDIS_URL}"},
            "topics": dict(self.topics),
            "worker": worker or {"in_flight": 64},
            "apis": apis,
            "enrichments": rules,
        }
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.config_path

    async def start(self) -> None:
        """Create the topics; start the producer, the tail and the RSS sampler."""
        await create_topics(self.kafka.url, self.topics.values(), PARTITIONS)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap,
            acks="all",
            max_request_size=4 * 1024 * 1024,
            request_timeout_ms=60_000,
        )
        await self._producer.start()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap,
            enable_auto_commit=False,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        tps = [
            TopicPartition(self.topics[k], p)
            for k in ("output", "dead_letter")
            for p in range(PARTITIONS)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._tasks += [asyncio.ensure_future(self._tail(consumer))]
        self._tasks += [asyncio.ensure_future(self._sample())]

    def start_worker(self, *extra: str) -> Worker:
        """Start ``enricher worker`` on the scene's config (``extra``: more arguments). Its
        environment is ours plus ``env`` and the Redis URL (kept out of the config file, so a
        password in it is nowhere on disk); :meth:`close` removes them again."""
        n = len(self.workers)
        command = [sys.executable, "-m", "enricher", "worker", "--config", str(self.config_path)]
        os.environ.update(self.env)  # spawn_child passes os.environ on
        os.environ["CHAOS_REDIS_URL"] = self.redis_url
        worker = Worker([*command, *extra], self.dir / f"worker{n}.log", self.dir).start()
        self.workers.append(worker)
        return worker

    async def _sample(self) -> None:
        while True:
            for worker in self.workers:
                worker.sample_rss()
            await asyncio.sleep(0.25)

    async def _tail(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for record in records:
                        self._absorb(tp.topic, record)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def _absorb(self, topic: str, record: Any) -> None:
        headers = dict(record.headers or ())
        source = headers.get("enricher-source", b"?").decode()
        if topic == self.topics["output"]:
            outcome = "output"
        else:
            try:
                outcome = str(json.loads(record.value)["error"]["kind"])
            except (ValueError, KeyError, TypeError):
                outcome = "unreadable"
        self.seen.setdefault(source, Seen()).outcomes.append(outcome)
        self.arrivals.append((time.time(), source))
        if self.keep_raw:
            self.raw.append(record.value or b"")

    async def produce(self, values: Iterable[tuple[bytes | None, bytes]]) -> None:
        """Send (key, value) records; keep each one's offset. Retries while the broker is away."""
        assert self._producer is not None
        futures = []
        for key, value in values:
            futures.append(await self._send(key, value))
        for future in futures:
            await self._record(await future)

    async def produce_paced(
        self, make: Callable[[int], tuple[bytes | None, bytes]], rate: float, seconds: float
    ) -> None:
        """``rate`` records a second for ``seconds``, record ``i`` being ``make(i)``."""
        started, i, pending = time.monotonic(), 0, []
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) + 1
            while i < due:
                pending.append(asyncio.ensure_future(self._send_and_record(*make(i))))
                i += 1
            await asyncio.sleep(0.05)
        await asyncio.gather(*pending)

    async def _send_and_record(self, key: bytes | None, value: bytes) -> None:
        await self._record(await (await self._send(key, value)))

    async def _send(self, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        assert self._producer is not None
        while True:
            try:
                future: asyncio.Future[Any] = await self._producer.send(
                    self.topics["input"], value, key=key
                )
                return future
            except KafkaError:
                await asyncio.sleep(0.5)

    async def _record(self, meta: Any) -> None:
        self.produced.append(f"{meta.topic}/{meta.partition}/{meta.offset}")

    async def wait_for(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        """Poll ``ready`` until true; fails naming ``what`` after ``timeout`` seconds."""
        started = time.monotonic()
        while not ready():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{self.name}: no {what} after {timeout:g}s (logs: {self.dir})")
            await asyncio.sleep(0.1)

    async def committed(self) -> dict[int, int]:
        """The group's committed offset per input partition (through a consumer of the group
        that subscribes to nothing: aiokafka's admin client cannot decode Tansu's reply)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap,
            group_id=self.app_id,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            tps = [TopicPartition(self.topics["input"], p) for p in range(PARTITIONS)]
            found = {tp.partition: await consumer.committed(tp) for tp in tps}
        finally:
            await consumer.stop()
        return {p: offset for p, offset in found.items() if offset is not None and offset >= 0}

    def produced_ends(self) -> dict[int, int]:
        """Per input partition, the offset after the last one produced."""
        ends: dict[int, int] = {}
        for source in self.produced:
            _, partition, offset = source.rsplit("/", 2)
            ends[int(partition)] = max(ends.get(int(partition), 0), int(offset) + 1)
        return ends

    def outstanding(self) -> int:
        return sum(1 for source in self.produced if source not in self.seen)

    async def drain(self, timeout: float, linger: float = 2.0) -> float:
        """Wait until every produced offset has a record (or ``timeout``), then ``linger`` to catch
        duplicates; the seconds the wait took."""
        started = time.monotonic()
        while self.outstanding() and time.monotonic() - started < timeout:
            if self.workers and not any(w.alive for w in self.workers):
                say(f"  every worker exited; logs in {self.dir}")
                break
            await asyncio.sleep(0.2)
        waited = time.monotonic() - started
        await asyncio.sleep(linger)
        return waited

    async def close(self) -> None:
        for worker in self.workers:
            await worker.stop()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        for name in ("CHAOS_REDIS_URL", *self.env):
            os.environ.pop(name, None)
