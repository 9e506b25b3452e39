"""The embedded stack the benchmarks run on, and one isolated *run* on it.

:class:`BenchStack` starts, once, on free loopback ports: a Tansu broker and Redis (the same
``services.py`` children the tests and ``enricher dev`` use) and the sandbox API as two
``enricher sandbox-api`` processes (no limit, no faults; one with zero latency, one answering in
:data:`SLOW_LATENCY`), so that neither the API nor the bench's own clients share a core's event
loop with the other.

:class:`Run` is one measurement: its own ``app_id`` (consumer group and Redis keys) and topics,
a config file, its processes (``enricher worker`` subprocesses, or the hand-written Faust apps
``bench.recipe`` / ``bench.forward``) and a consumer tailing the output and dead-letter topics
that keeps only what the figures need (broker timestamps, replay header).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from aiokafka.admin import AIOKafkaAdminClient

from enricher.kafka import create_topics
from enricher.services import (
    LOOPBACK,
    EmbeddedKafka,
    EmbeddedRedis,
    find_free_port,
    run_enricher,
    spawn_child,
    stop_child,
)

from .faustapp import AppEnv
from .proc import cpu_seconds, peak_rss_mb, rss_mb

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
SLOW_LATENCY = 0.05  # seconds: the latency-bound scenario's API
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


class BenchStack:
    """Tansu, Redis and the sandbox API, started once for every scenario."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="enricher-bench-"))
        self.kafka = EmbeddedKafka()
        self.redis_service = EmbeddedRedis()
        self.sandbox_port = find_free_port()
        self.sandbox_url = f"http://{LOOPBACK}:{self.sandbox_port}"
        self.slow_port = find_free_port()
        self.slow_url = f"http://{LOOPBACK}:{self.slow_port}"
        self.sandboxes: list[subprocess.Popen[bytes]] = []
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
        for name, port, latency in (
            ("sandbox", self.sandbox_port, "0"),
            ("sandbox-slow", self.slow_port, f"{SLOW_LATENCY * 1000:g}ms"),
        ):
            command = [sys.executable, "-m", "enricher", "sandbox-api"]
            command += ["--host", LOOPBACK, "--port", str(port), "--latency", latency]
            self.sandboxes.append(
                spawn_child(command, log_path=self.workdir / f"{name}.log", cwd=self.workdir)
            )
        self._redis = aioredis.Redis.from_url(self.redis_service.url)
        self._http = aiohttp.ClientSession()
        async with asyncio.timeout(20):
            for url, proc in zip((self.sandbox_url, self.slow_url), self.sandboxes, strict=True):
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"sandbox API exited; see logs in {self.workdir}")
                    with contextlib.suppress(aiohttp.ClientError):
                        await self.sandbox_stats(url)
                        break
                    await asyncio.sleep(0.1)

    async def stop(self, *, keep_workdir: bool = False) -> None:
        try:
            if self._http is not None:
                await self._http.close()
            if self._redis is not None:
                await self._redis.aclose()
            for proc in self.sandboxes:
                await stop_child(proc, 5.0)
        finally:
            await asyncio.to_thread(self.kafka.close)
            await asyncio.to_thread(self.redis_service.close)
            if not keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    async def sandbox_stats(self, url: str | None = None) -> dict[str, Any]:
        """The ``/stats`` of the sandbox at ``url`` (default: the zero-latency one)."""
        async with self.http.get(f"{url or self.sandbox_url}/stats") as response:
            response.raise_for_status()
            stats: dict[str, Any] = await response.json()
            return stats

    async def sandbox_reset(self, url: str | None = None) -> None:
        """Make the sandbox at ``url`` forget what it saw (its per-second counts included)."""
        async with self.http.post(f"{url or self.sandbox_url}/stats/reset") as response:
            response.raise_for_status()

    async def sandbox_calls(self, url: str | None = None) -> int:
        """Calls the sandbox at ``url`` (default: the zero-latency one) has seen so far."""
        return int((await self.sandbox_stats(url))["calls"])

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

    def commands_per_event(self, events: int) -> dict[str, float]:
        """Calls per command (Lua's included), per event."""
        return {name: round(n / events, 3) for name, n in sorted(self.commands.items())}


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


class Run:
    """One measurement's topics, consumer group, config, processes and output tail."""

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
        self.worker: subprocess.Popen[bytes] | None = None  # the first process started
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tail = Tail()
        self._consumer: AIOKafkaConsumer | None = None
        self._tailing: asyncio.Task[None] | None = None

    def write_config(
        self,
        in_flight: int,
        concurrency: int,
        *,
        api_url: str | None = None,
        matching: bool = True,
        **api: Any,
    ) -> Path:
        """A config with one API ``geo`` on the sandbox at ``api_url`` (default: the zero-latency
        one); ``api``: its other settings. ``matching=False``: its rule matches no event (each
        passes through with an empty ``enrichment``, no API call)."""
        url = f"{api_url or self.stack.sandbox_url}/geo/{{ip}}"
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
                    "when": {"type": "page_view" if matching else "no-such-type"},
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
        """One more ``enricher worker`` on this run's config."""
        command = [sys.executable, "-m", "enricher", "worker", "--config", str(self.config_path)]
        self._start(command)

    def start_app(
        self, module: str, *, api_url: str = "", rate: float = 0.0, concurrency: int = 1
    ) -> None:
        """One more hand-written Faust app process (``bench.recipe`` or ``bench.forward``) on
        this run's topics and consumer group; ``api_url`` is a sandbox's base URL."""
        env = AppEnv(
            app_id=self.app_id,
            broker=self.stack.kafka.url,
            input=self.topics["input"],
            output=self.topics["output"],
            web_port=find_free_port(),
            api_url=f"{api_url}/geo/{{ip}}" if api_url else "",
            rate=rate,
            concurrency=concurrency,
        )
        # The bench's own modules run from the checkout (they are not an installed package).
        root = f"PYTHONPATH={Path(__file__).resolve().parent.parent}"
        command = ["env", *env.assignments(), root, sys.executable, "-m", module, "worker"]
        self._start([*command, "--loglevel", "warn"])

    def _start(self, command: list[str]) -> None:
        log = self.dir / f"worker-{len(self.procs)}.log"
        proc = spawn_child(
            command, log_path=log, cwd=self.dir
        )  # the run's directory: Faust's data dir
        self.procs.append(proc)
        self.worker = self.worker or proc

    async def wait_for_members(self, count: int, timeout: float = 60.0) -> None:
        """Until the consumer group is stable with ``count`` members."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.stack.kafka.bootstrap)
        await admin.start()
        try:
            deadline = time.monotonic() + timeout
            while True:
                self._check_alive()
                groups = await admin.describe_consumer_groups([self.app_id])
                group = groups[0].groups[0] if groups and groups[0].groups else None
                if group and group[2] == "Stable" and len(group[5]) == count:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{count} members not joined after {timeout:g}s")
                await asyncio.sleep(0.25)
        finally:
            await admin.close()

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"process {proc.pid} exited with {proc.returncode}; {self.log_hint}"
                )

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
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no output after {timeout:g}s")
            await asyncio.sleep(0.01)

    async def wait_live(self, count: int, timeout: float) -> None:
        await self._wait(lambda: len(self.tail.live_times) + self.tail.dead_letters, count, timeout)

    async def wait_live_or(self, count: int, *, budget: float, timeout: float) -> None:
        """Until ``count`` live outputs, or ``budget`` seconds after the first (for a slow side
        measured on part of the events)."""
        await self.wait_first_live(timeout)
        deadline = time.monotonic() + budget
        while len(self.tail.live_times) < count and time.monotonic() < deadline:
            self._check_alive()
            await asyncio.sleep(0.1)

    async def wait_replay(self, replay_id: str, count: int, timeout: float) -> None:
        await self._wait(lambda: len(self.tail.replay_times[replay_id]), count, timeout)

    async def _wait(self, seen: Any, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while seen() < count:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{seen()} of {count} outputs after {timeout:g}s")
            await asyncio.sleep(0.1)
        if self.tail.dead_letters:
            raise RuntimeError(f"{self.tail.dead_letters} dead letters; {self.log_hint}")

    @property
    def log_hint(self) -> str:
        return f"logs: {self.dir}/worker-*.log"

    def worker_cpu_seconds(self) -> float | None:
        return cpu_seconds(self.worker.pid) if self.worker is not None else None

    def worker_rss_mb(self) -> float | None:
        return rss_mb(self.worker.pid) if self.worker is not None else None

    def worker_peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.worker.pid) if self.worker is not None else None

    async def enricher(self, *args: str, timeout: float = 60.0) -> str:
        """Run an ``enricher`` command; its stdout (raises on a non-zero exit)."""
        code, out, err = await run_enricher(*args, timeout=timeout)
        if code != 0:
            raise RuntimeError(f"enricher {' '.join(args)}: exit {code}: {err}")
        return out

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

    async def stop_processes(self) -> None:
        """Stop every process of the run, all at once (each SIGTERM, then SIGKILL if need be)."""
        procs, self.procs = self.procs, []
        await asyncio.gather(*(stop_child(proc, WORKER_STOP_TIMEOUT) for proc in procs))

    async def stop(self) -> None:
        """Stop the processes and the tail (the run's directory goes with the stack's)."""
        try:
            await self.stop_processes()
        finally:
            tailing, self._tailing = self._tailing, None
            consumer, self._consumer = self._consumer, None
            if tailing is not None:
                tailing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tailing
            if consumer is not None:
                await consumer.stop()
