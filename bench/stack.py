"""The embedded stack the benchmarks run on, and one isolated *run* on it.

:class:`BenchStack` starts, once, on free loopback ports: a Tansu broker and Redis (the same
``services.py`` children the tests and ``enricher dev`` use) and the sandbox API as its own
``enricher sandbox-api`` process (zero latency, no limit, no faults), so that neither the API nor
the bench's own clients share a core's event loop with the other.

:class:`Run` is one measurement: its own ``app_id`` (consumer group and Redis keys) and topics,
a config file, one ``enricher worker`` subprocess and a consumer tailing the output and
dead-letter topics that keeps only what the figures need (broker timestamps, replay header).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from enricher.kafka import create_topics
from enricher.services import (
    LOOPBACK,
    EmbeddedKafka,
    EmbeddedRedis,
    find_free_port,
    spawn_child,
    stop_child,
)

__all__ = [
    "PARTITIONS",
    "BenchStack",
    "RedisCounts",
    "RedisMark",
    "Run",
    "Tail",
    "page_view",
    "say",
]

PARTITIONS = 4
REPLAY_HEADER = "enricher-replay"
WORKER_STOP_TIMEOUT = 10.0
_T0 = time.monotonic()


def say(line: str) -> None:
    """A progress line, stamped with the seconds since the bench started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {line}", flush=True)


def page_view(i: int) -> dict[str, Any]:
    """Event ``i``: a page view with its own IP (so its own API request and cache entry)."""
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    return {"type": "page_view", "user": f"u{i}", "seq": i, "client": {"ip": ip}}


def _spawn(command: list[str], log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    return spawn_child(command, log_path=log_path, cwd=cwd)


async def stop_process(proc: subprocess.Popen[bytes], timeout: float = WORKER_STOP_TIMEOUT) -> None:
    """SIGTERM the process group, SIGKILL it after ``timeout``; reap it."""
    await stop_child(proc, timeout)


def rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` in MB (from /proc; None where there is no /proc or it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (from /proc; None where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class BenchStack:
    """Tansu, Redis and the sandbox API, started once for every scenario."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="enricher-bench-"))
        self.kafka = EmbeddedKafka()
        self.redis_service = EmbeddedRedis()
        self.sandbox_port = find_free_port()
        self.sandbox_url = f"http://{LOOPBACK}:{self.sandbox_port}"
        self.sandbox: subprocess.Popen[bytes] | None = None
        self._redis: aioredis.Redis | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "start() first"
        return self._redis

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "start() first"
        return self._http

    async def start(self) -> None:
        """Start everything; whatever started is left to ``stop`` on failure."""
        await self.kafka.astart()
        await self.redis_service.astart()
        command = [sys.executable, "-m", "enricher", "sandbox-api"]
        command += ["--host", LOOPBACK, "--port", str(self.sandbox_port), "--latency", "0"]
        self.sandbox = _spawn(command, self.workdir / "sandbox.log", self.workdir)
        self._redis = aioredis.Redis.from_url(self.redis_service.url)
        self._http = aiohttp.ClientSession()
        async with asyncio.timeout(20):
            while True:
                if self.sandbox.poll() is not None:
                    raise RuntimeError(f"sandbox API exited; see {self.workdir / 'sandbox.log'}")
                with contextlib.suppress(aiohttp.ClientError):
                    await self.sandbox_stats()
                    break
                await asyncio.sleep(0.1)

    async def stop(self, *, keep_workdir: bool = False) -> None:
        try:
            if self._http is not None:
                await self._http.close()
            if self._redis is not None:
                await self._redis.aclose()
            if self.sandbox is not None:
                await stop_process(self.sandbox, 5.0)
        finally:
            await asyncio.to_thread(self.kafka.close)
            await asyncio.to_thread(self.redis_service.close)
            if not keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    async def sandbox_stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.sandbox_url}/stats") as response:
            response.raise_for_status()
            stats: dict[str, Any] = await response.json()
            return stats

    async def sandbox_calls(self) -> int:
        return int((await self.sandbox_stats())["calls"])

    async def redis_mark(self) -> RedisMark:
        """Start counting Redis work (see :class:`RedisCounts`)."""
        return RedisMark(*await self._redis_info())

    async def redis_since(self, mark: RedisMark) -> RedisCounts:
        """What Redis did since ``mark``, this INFO call left out."""
        reads, commands = await self._redis_info()
        total = {k: n - mark.commands[k] for k, n in commands.items() if n > mark.commands[k]}
        return RedisCounts(reads - mark.reads - 1, total)

    async def _redis_info(self) -> tuple[int, Counter[str]]:
        """(client reads processed, calls per command) so far; the bench's INFO calls left out."""
        info: dict[str, Any] = await self.redis.info("stats", "commandstats")
        commands: Counter[str] = Counter()
        for name, stats in info.items():
            if name.startswith("cmdstat_") and name != "cmdstat_info":
                commands[name.removeprefix("cmdstat_")] = int(stats["calls"])
        return int(info["total_reads_processed"]), commands

    def new_run(self, name: str) -> Run:
        return Run(self, name)


@dataclass(frozen=True, slots=True)
class RedisMark:
    reads: int
    commands: Counter[str]


@dataclass(frozen=True, slots=True)
class RedisCounts:
    """Redis work over a measurement.

    ``round_trips``: requests read from clients (``INFO stats`` ``total_reads_processed``): one
    per command sent alone, one per pipeline, plus a few per new connection (HELLO...).
    ``commands``: calls per command (``INFO commandstats``), the commands Lua scripts run included
    (one EVALSHA of a script that runs TIME, HGETALL, 2 GETs and a SET counts 6).
    """

    round_trips: int
    commands: dict[str, int]

    def per_event(self, events: int) -> tuple[float, float]:
        """(round trips, commands) per event."""
        return self.round_trips / events, sum(self.commands.values()) / events


@dataclass
class Tail:
    """What the output and dead-letter topics received: broker timestamps (ms), by lane."""

    live_times: list[int] = field(default_factory=list)
    replay_times: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: int = 0

    def absorb(self, tp: TopicPartition, output_topic: str, records: list[Any]) -> None:
        for record in records:
            headers = dict(record.headers or ())
            if tp.topic != output_topic:
                self.dead_letters += 1
            elif REPLAY_HEADER in headers:
                self.replay_times[headers[REPLAY_HEADER].decode()].append(record.timestamp)
            else:
                self.live_times.append(record.timestamp)


def events_per_second(times: list[int]) -> float:
    """(n - 1) / (last - first), from broker timestamps in ms: the rate between the two."""
    if len(times) < 2:
        return float("nan")
    span = (max(times) - min(times)) / 1000
    return (len(times) - 1) / span if span > 0 else float("inf")


def span_seconds(times: list[int]) -> float:
    return (max(times) - min(times)) / 1000 if times else 0.0


class Run:
    """One measurement's topics, consumer group, config, worker and output tail."""

    def __init__(self, stack: BenchStack, name: str) -> None:
        self.stack = stack
        suffix = uuid.uuid4().hex[:8]
        self.app_id = f"bench-{name}-{suffix}"
        self.dir = stack.workdir / self.app_id
        self.dir.mkdir()
        self.topics = {
            kind: f"{kind}-{suffix}" for kind in ("input", "output", "dead_letter", "replay")
        }
        self.config_path = self.dir / "enricher.yaml"
        self.worker: subprocess.Popen[bytes] | None = None
        self.tail = Tail()
        self._consumer: AIOKafkaConsumer | None = None
        self._tailing: asyncio.Task[None] | None = None

    def write_config(self, in_flight: int, concurrency: int, **api: Any) -> Path:
        """A config with one API ``geo`` on the sandbox (``api``: its other settings)."""
        url = f"{self.stack.sandbox_url}/geo/{{ip}}"
        settings: dict[str, Any] = {"url": url, "concurrency": concurrency, **api}
        data = {
            "app_id": self.app_id,
            "kafka": {
                "broker": self.stack.kafka.url,
                "partitions": PARTITIONS,
                "rebalance_timeout": "3s",
                "session_timeout": "3s",
            },
            "redis": {"url": self.stack.redis_service.url},
            "topics": dict(self.topics),
            "worker": {"in_flight": in_flight},
            "apis": {"geo": settings},
            "enrichments": [
                {
                    "when": {"type": "page_view"},
                    "api": "geo",
                    "params": {"ip": "client.ip"},
                    "into": "geo",
                }
            ],
        }
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.config_path

    async def start(self) -> None:
        """Create the topics and start tailing the outputs (the worker is started apart)."""
        await create_topics(self.stack.kafka.url, self.topics.values(), PARTITIONS)
        consumer = self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.stack.kafka.bootstrap, enable_auto_commit=False
        )
        await consumer.start()
        tps = [
            TopicPartition(self.topics[kind], p)
            for kind in ("output", "dead_letter")
            for p in range(PARTITIONS)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._tailing = asyncio.ensure_future(self._tail(consumer))

    async def _tail(self, consumer: AIOKafkaConsumer) -> None:
        output = self.topics["output"]
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                self.tail.absorb(tp, output, records)

    def start_worker(self) -> None:
        command = [sys.executable, "-m", "enricher", "worker", "--config", str(self.config_path)]
        self.worker = _spawn(command, self.dir / "worker.log", self.dir)  # Faust's data dir

    async def produce(self, count: int) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.stack.kafka.bootstrap, acks="all")
        await producer.start()
        try:
            sent = []
            for i in range(count):
                event = page_view(i)
                value, key = json.dumps(event).encode(), event["user"].encode()
                sent.append(await producer.send(self.topics["input"], value, key=key))
            await asyncio.gather(*sent)
        finally:
            await producer.stop()

    async def wait_first_live(self, timeout: float) -> None:
        """Until the first live output is seen (polled every 10 ms)."""
        deadline = time.monotonic() + timeout
        while not self.tail.live_times:
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"worker exited with {self.worker.returncode}; {self.log_hint}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no output after {timeout:g}s")
            await asyncio.sleep(0.01)

    async def wait_live(self, count: int, timeout: float) -> None:
        await self._wait(lambda: len(self.tail.live_times) + self.tail.dead_letters, count, timeout)

    async def wait_replay(self, replay_id: str, count: int, timeout: float) -> None:
        await self._wait(lambda: len(self.tail.replay_times[replay_id]), count, timeout)

    async def _wait(self, seen: Any, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while seen() < count:
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"worker exited with {self.worker.returncode}; {self.log_hint}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{seen()} of {count} outputs after {timeout:g}s")
            await asyncio.sleep(0.1)
        if self.tail.dead_letters:
            raise RuntimeError(f"{self.tail.dead_letters} dead letters; {self.log_hint}")

    @property
    def log_hint(self) -> str:
        return f"worker log: {self.dir / 'worker.log'}"

    def worker_cpu_seconds(self) -> float | None:
        return cpu_seconds(self.worker.pid) if self.worker is not None else None

    def worker_rss_mb(self) -> float | None:
        return rss_mb(self.worker.pid) if self.worker is not None else None

    async def enricher(self, *args: str, timeout: float = 60.0) -> str:
        """Run an ``enricher`` command; its stdout (raises on a non-zero exit)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "enricher",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"enricher {' '.join(args)}: exit {proc.returncode}: {err.decode()}")
        return out.decode()

    async def replay(self, share: float) -> str:
        """Start a detached replay of the last hour's input; its id."""
        out = await self.enricher(
            "replay",
            "--config",
            str(self.config_path),
            "--from",
            "-1h",
            "--yes",
            "--detach",
            "--share",
            f"{share:g}",
        )
        return out.strip().splitlines()[-1].strip()

    async def replay_state(self, replay_id: str) -> str:
        out = await self.enricher(
            "replay", "status", replay_id, "--config", str(self.config_path), "--json"
        )
        return str(json.loads(out)["state"])

    async def stop(self) -> None:
        """Stop the worker and the tail (the run's directory goes with the stack's)."""
        try:
            if self.worker is not None:
                await stop_process(self.worker)
        finally:
            tailing, self._tailing = self._tailing, None
            consumer, self._consumer = self._consumer, None
            if tailing is not None:
                tailing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tailing
            if consumer is not None:
                await consumer.stop()
