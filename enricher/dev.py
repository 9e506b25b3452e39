"""``enricher dev``: the whole stack on one machine, observed live.

:class:`DevStack` starts, on free loopback ports: a Tansu broker and Redis (``services.py``), one
sandbox API per configured API (in this process, so its stats can be read directly), ``workers``
``enricher worker`` processes sharing an effective config written to a private temp dir, a demo
producer at a steady pace and a consumer that tallies the output and dead-letter topics. Every
process it starts is a child in its own process group, stopped by :meth:`DevStack.stop` (workers:
SIGTERM, SIGKILL after 10 s) and, should this process die abruptly, sent SIGTERM by Linux.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.live import Live

from .config import Config, load_config
from .demo import DemoEvents, encode
from .dev_display import ApiFigures, Snapshot, progress_line, render, summary_lines
from .errors import ConfigError
from .kafka import create_topics, kafka_options, start_producer
from .kafka_security import aiokafka_security
from .produce import key_for
from .quota import read_usage
from .runtime import connect_redis
from .sandbox import SandboxServer, SandboxSettings, run_sandbox
from .services import EmbeddedKafka, EmbeddedRedis, spawn_child, stop_child

__all__ = [
    "DevOptions",
    "DevStack",
    "default_config_path",
    "effective_config",
    "run_dev",
    "sandbox_url",
]

EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "enricher.yaml"
WORKER_STOP_TIMEOUT = 10.0
# Tansu keeps a departed member until its session expires: short timeouts make joins quick.
DEV_KAFKA_TIMEOUTS = {"rebalance_timeout": "3s", "session_timeout": "3s"}


@dataclass(frozen=True, slots=True)
class DevOptions:
    """What ``enricher dev`` runs; the sandboxes answer after ``api_latency`` (a range, in
    seconds) and fail a share ``api_error_rate`` of calls with 500/502/503."""

    config_path: Path
    workers: int = 2
    events_per_second: float = 100.0
    seed: int = 0
    api_latency: tuple[float, float] = (0.02, 0.15)
    api_error_rate: float = 0.02


def default_config_path() -> Path:
    """The repository's ``examples/enricher.yaml`` (a source checkout), else ``./examples/``."""
    for candidate in (EXAMPLE_CONFIG, Path("examples", "enricher.yaml")):
        if candidate.is_file():
            return candidate
    raise ConfigError("--config", "examples/enricher.yaml not found; give a config file")


def sandbox_url(template: str, sandbox: str) -> str:
    """``template`` (an API URL) with the scheme, host and port of ``sandbox``."""
    base, parts = urlsplit(sandbox), urlsplit(template)
    return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))


def effective_config(
    raw: dict[str, Any] | None, *, kafka_url: str, redis_url: str, api_urls: dict[str, str]
) -> dict[str, Any]:
    """``raw`` (a parsed config file) with the embedded broker, Redis and API URLs.

    The rest, ``${VAR}`` references included, is kept for the workers to expand as usual,
    except ``kafka.security`` (the embedded broker speaks plain Kafka).
    """
    data = dict(raw or {})
    # the embedded broker is plain, on loopback: a production config's TLS / SASL does not apply
    kafka = {k: v for k, v in (data.get("kafka") or {}).items() if k != "security"}
    data["kafka"] = {**kafka, "broker": kafka_url, **DEV_KAFKA_TIMEOUTS}
    data["redis"] = {**(data.get("redis") or {}), "url": redis_url}
    apis = data.get("apis") or {}
    data["apis"] = {name: {**api, "url": api_urls[name]} for name, api in apis.items()}
    return data


class _Tally:
    """Reads the output and dead-letter topics from the start; counts and keeps the latest."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.outputs = self.enriched = 0
        self.dead_letters: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=5)

    async def run(self, consumer: AIOKafkaConsumer) -> None:
        topics = self.config.topics
        partitions = [
            TopicPartition(topic, p)
            for topic in (topics.output, topics.dead_letter)
            for p in range(self.config.kafka.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=250)).items():
                for record in records:
                    with contextlib.suppress(ValueError, AttributeError):
                        self._count(tp.topic == topics.output, json.loads(record.value))

    def _count(self, is_output: bool, body: dict[str, Any]) -> None:
        if not is_output:
            self.dead_letters[str(body.get("error", {}).get("kind"))] += 1
            return
        self.outputs += 1
        if body.get("enrichment"):
            self.enriched += 1
            self.recent.append(body)


class DevStack:
    """The processes and clients of one ``enricher dev`` run: ``start``, ``snapshot``, ``stop``."""

    def __init__(self, options: DevOptions) -> None:
        self.options = options
        self.workdir = Path(tempfile.mkdtemp(prefix="enricher-dev-"))
        self.kafka = EmbeddedKafka()
        self.redis = EmbeddedRedis()
        self.sandboxes: dict[str, SandboxServer] = {}
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.config: Config | None = None
        self.produced = 0
        self._tally: _Tally | None = None
        self._redis: aioredis.Redis | None = None
        self._producing: asyncio.Task[None] | None = None
        self._exit = AsyncExitStack()
        self._started_at = time.monotonic()

    @property
    def pids(self) -> dict[str, int]:
        """Every process this stack started (the sandboxes run in this one)."""
        services = {"kafka": self.kafka.pid, "redis": self.redis.pid}
        found = {name: pid for name, pid in services.items() if pid is not None}
        return found | {name: proc.pid for name, proc in self.workers.items()}

    async def start(self) -> None:
        """Start everything; on failure (or cancellation) whatever started is left to ``stop``."""
        original = load_config(self.options.config_path)  # validated before anything starts
        self._exit.push_async_callback(asyncio.to_thread, self.kafka.close)
        self._exit.push_async_callback(asyncio.to_thread, self.redis.close)
        await self.kafka.astart()  # one after the other: a failure leaves no start pending
        await self.redis.astart()
        for index, api in enumerate(original.apis.values()):
            await self._start_sandbox(api.name, api.rate.per_second, api.burst, index)
        config = self.config = self._write_config(original)
        topics = config.topics
        names = [topics.input, topics.output, topics.dead_letter, topics.replay]
        await create_topics(
            config.kafka.broker,
            names,
            config.kafka.partitions,
            security=aiokafka_security(config.kafka.security),
        )
        self._exit.push_async_callback(self._stop_workers)
        for number in range(1, self.options.workers + 1):
            self._spawn_worker(f"worker-{number}")
        self._started_at = time.monotonic()
        await self._start_clients(config)

    async def _start_sandbox(self, name: str, rate: float, burst: int, index: int) -> None:
        # A provider that allows what the config says, with room for a few ms of network jitter.
        settings = SandboxSettings(
            rate=rate,
            burst=burst * 2,
            latency=self.options.api_latency,
            error_rate=self.options.api_error_rate,
            seed=self.options.seed + index,
        )
        sandbox = self.sandboxes[name] = await run_sandbox(settings, port=0)
        self._exit.push_async_callback(sandbox.close)

    def _write_config(self, original: Config) -> Config:
        raw = yaml.safe_load(self.options.config_path.read_text(encoding="utf-8"))
        urls = {
            name: sandbox_url(api.url, self.sandboxes[name].url)
            for name, api in original.apis.items()
        }
        data = effective_config(
            raw, kafka_url=self.kafka.url, redis_url=self.redis.url, api_urls=urls
        )
        path = self.workdir / "enricher.yaml"
        header = f"# enricher dev: {self.options.config_path} on the embedded services\n"
        path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return load_config(path)

    def _spawn_worker(self, name: str) -> None:
        command = [sys.executable, "-m", "enricher", "worker", "--config", "enricher.yaml"]
        # cwd: Faust writes its data dir there
        log_path = self.workdir / f"{name}.log"
        self.workers[name] = spawn_child(command, log_path=log_path, cwd=self.workdir)

    async def _start_clients(self, config: Config) -> None:
        producer = await start_producer(config)
        self._exit.push_async_callback(producer.stop)
        consumer = AIOKafkaConsumer(**kafka_options(config), enable_auto_commit=False)
        await consumer.start()
        self._exit.push_async_callback(consumer.stop)
        redis = connect_redis(config)
        self._exit.push_async_callback(redis.aclose)
        self._redis = redis
        self._tally = _Tally(config)
        self._task(self._tally.run(consumer))
        self._producing = self._task(self._produce(producer, config.topics.input))

    def _task(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._exit.push_async_callback(_cancel, task)
        return task

    async def _produce(self, producer: AIOKafkaProducer, topic: str) -> None:
        """Send ``events_per_second``, steadily, stamped with the current time."""
        events, rate = DemoEvents(self.options.seed), self.options.events_per_second
        started = time.monotonic()
        while True:
            due = int((time.monotonic() - started) * rate) - self.produced
            for event in (next(events) for _ in range(min(due, 1000))):
                event["ts"] = datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
                await producer.send(topic, encode(event), key=key_for(event, "user_id"))
                self.produced += 1
            await asyncio.sleep(0.05)

    async def stop_producing(self) -> None:
        if self._producing is not None:
            await _cancel(self._producing)

    async def snapshot(self) -> Snapshot:
        """The current figures (quota usage is read from Redis)."""
        assert self.config and self._tally and self._redis, "start() first"
        apis = []
        for name, sandbox in self.sandboxes.items():
            api = self.config.apis[name]
            usage = await read_usage(self._redis, self.config.app_id, api)
            figures = ApiFigures(
                name, api.rate.per_second, api.burst, sandbox.stats(), usage.quotas
            )
            apis.append(figures)
        tally = self._tally
        return Snapshot(
            elapsed=time.monotonic() - self._started_at,
            produced=self.produced,
            outputs=tally.outputs,
            enriched=tally.enriched,
            dead_letters=Counter(tally.dead_letters),
            recent=tuple(tally.recent),
            apis=tuple(apis),
            workers=tuple((n, p.pid, p.poll()) for n, p in self.workers.items()),
        )

    async def drain(self, timeout: float) -> Snapshot:
        """Stop producing, then wait up to ``timeout`` for every event to come out."""
        await self.stop_producing()
        deadline = time.monotonic() + timeout
        snapshot = await self.snapshot()
        while snapshot.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            snapshot = await self.snapshot()
        return snapshot

    async def stop(self, *, keep_workdir: bool = False) -> None:
        """Stop every client and process started, newest first; delete the temp dir unless asked."""
        try:
            await self._exit.aclose()
        finally:
            if not keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    async def _stop_workers(self) -> None:
        await asyncio.gather(
            *(stop_child(proc, WORKER_STOP_TIMEOUT) for proc in self.workers.values())
        )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_dev(options: DevOptions, *, duration: float | None, live: bool) -> int:
    """Run the stack until ``duration`` has passed or SIGINT/SIGTERM; returns the exit code.

    0 when no limit was exceeded and no worker died (and, for a ``duration`` run that was not
    interrupted, something was enriched); 1 otherwise; 130 when stopped before it was up.
    """
    load_config(options.config_path)  # a bad config: exit 2 before anything starts
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    stack, code = DevStack(options), 1
    try:
        if not await _unless_stopped(stopping, stack.start()):
            _say("stopped while starting")
            code = 130
            return code
        _say("started pids: " + " ".join(f"{name}={pid}" for name, pid in stack.pids.items()))
        _say(f"config: {stack.workdir / 'enricher.yaml'} (from {options.config_path})")
        await _watch(stack, stopping, duration, live)
        interrupted = stopping.is_set()
        _say("interrupted" if interrupted else "time is up; draining for up to 5s...")
        snapshot = await stack.drain(0.0 if interrupted else 5.0)
        for line in summary_lines(snapshot):
            _say(line)
        failed = snapshot.exceeded or snapshot.workers_died
        code = 1 if failed or (not interrupted and snapshot.enriched == 0) else 0
        _say(f"  result: {'ok' if code == 0 else 'FAILED'}")
        return code
    finally:
        _say("stopping workers (up to 10 s), the sandbox API, Redis and the broker...")
        keep = code == 1 and bool(stack.workers)
        await stack.stop(keep_workdir=keep)
        if keep:
            _say(f"worker logs kept in {stack.workdir}")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _say(line: str) -> None:
    print(line, flush=True)


async def _unless_stopped(stopping: asyncio.Event, coroutine: Awaitable[None]) -> bool:
    """Run ``coroutine`` unless ``stopping`` is set first (then cancel it); True if it ran."""
    work, stop = asyncio.ensure_future(coroutine), asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, stop):
            task.cancel()
    if not work.cancelled() and work.done():
        work.result()  # start() failed: raise its error
        return True
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return False


async def _watch(
    stack: DevStack, stopping: asyncio.Event, duration: float | None, live: bool
) -> None:
    """Show the figures (live, 2x/s; else a line every 5 s) until stopped or ``duration``."""
    deadline = None if duration is None else time.monotonic() + duration
    interval = 0.5 if live else 5.0
    view = Live(console=Console(), refresh_per_second=2) if live else contextlib.nullcontext()
    with view:
        while not stopping.is_set():
            left = interval if deadline is None else min(interval, deadline - time.monotonic())
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), left)
            snapshot = await stack.snapshot()
            if isinstance(view, Live):
                view.update(render(snapshot, time.time()))
            else:
                _say(progress_line(snapshot, time.time()))
