"""The broker restarted under load: Tansu on S3 storage (a moto server), so it comes back with its
topics, records and committed offsets, on the same port; the workers are never restarted."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from enricher.services import EmbeddedKafka, EmbeddedS3

from .outages import IN_FLIGHT, LIMITS, RATE
from .scenario import Result, api, finish, geo_rule, page_view
from .stack import PARTITIONS, ChaosStack, Scene, say

__all__ = ["broker_restart", "input_records"]

WORKERS = 2
LOAD = 20.0  # events/s, under the API's 50/s: the backlog of an outage drains at 30/s
BETWEEN = 15.0  # seconds from one restart to the next stop


async def broker_restart(stack: ChaosStack, scale: float) -> Result:
    """Two workers at 20 events/s; the broker is stopped (SIGTERM), then crashed (SIGKILL), each
    time started again on the same port ~10 s later: every input ends as one output, the
    committed offsets survive, and the workers carry on by themselves."""
    result, outage = Result("broker-restart"), max(5.0, 10.0 * scale)
    async with EmbeddedS3() as s3, EmbeddedKafka(storage=s3.storage) as kafka:
        scene = Scene(stack, "broker-restart", kafka=kafka)
        scene.config({"geo": api("/geo/{ip}", RATE, 10)}, [geo_rule()])
        await scene.start()
        for _ in range(WORKERS):
            scene.start_worker()
        try:
            await _run(result, scene, kafka, outage)
        finally:
            await scene.close()
    return result


@dataclass
class _Restart:
    """One stop and start of the broker: when, and which inputs it held up."""

    how: str
    stopped: float = 0.0
    back: float = 0.0
    acked_before: int = 0  # len(scene.produced) when the broker came back
    backlog: set[str] = field(default_factory=set)  # inputs acked in its first second back


async def _run(result: Result, scene: Scene, kafka: EmbeddedKafka, outage: float) -> None:
    await scene.produce(page_view(i) for i in range(5))
    await scene.wait_for("first output", lambda: bool(scene.seen), 60)
    restarts = [_Restart("SIGTERM"), _Restart("SIGKILL")]

    async def restart(r: _Restart, stop: Callable[[], None]) -> None:
        before = await scene.committed()
        say(f"  broker {r.how}, down for {outage:g} s")
        r.stopped = time.time()
        await asyncio.to_thread(stop)
        await asyncio.sleep(outage)
        await kafka.astart()
        r.back, r.acked_before = time.time(), len(scene.produced)
        say("  broker back on the same port")
        after = await scene.committed()
        kept = all(after.get(p, -1) >= offset for p, offset in before.items())
        result.figures[f"committed_{r.how}"] = {"before": before, "after": after}
        result.check(
            f"committed offsets kept across the {r.how}",
            kept and bool(before),
            f"{before} -> {after}",
        )
        await asyncio.sleep(max(0.0, r.back + 1 - time.time()))
        r.backlog = set(scene.produced[r.acked_before :])

    async def outages() -> None:
        await asyncio.sleep(6)
        await restart(restarts[0], kafka.stop)
        await asyncio.sleep(BETWEEN)
        await restart(restarts[1], kafka.kill)

    task = asyncio.ensure_future(outages())
    with _quiet("aiokafka"):  # our producer and tail log every failed reconnect
        await scene.produce_paced(lambda i: page_view(i + 5), LOAD, 2 * outage + BETWEEN + 21)
        await task
    load_end = time.time()
    await scene.drain(120)
    figures = _figures(scene, restarts, load_end)
    await _account_unacked(result, scene)
    finish(result, scene, LIMITS, allow_duplicates=len(restarts) * 2 * WORKERS * IN_FLIGHT)
    result.recover_s = max(figures["next_output_s"])
    result.figures |= {"outage_s": outage, **figures}
    resumed = _first_after(
        scene, restarts[-1].back, set(scene.produced[restarts[-1].acked_before :])
    )
    result.check(
        "every partition resumes, no worker restarted",
        len(resumed) == PARTITIONS and len(scene.workers) == WORKERS,
        f"{len(resumed)}/{PARTITIONS} input partitions output an input written after the last "
        f"restart, the last {max(resumed.values(), default=float('inf')):.1f} s after it",
    )


def _figures(scene: Scene, restarts: list[_Restart], load_end: float) -> dict[str, list[float]]:
    """Per restart: seconds from the broker's return to the next output, to the first output of
    every input partition, to the last output for what was held up (the inputs acked in its
    first second back); the longest silence of one partition until the next stop."""
    ends = [r.stopped for r in restarts[1:]] + [load_end]
    figures: dict[str, list[float]] = {"next_output_s": [], "every_partition_s": []}
    figures |= {"backlog_drained_s": [], "longest_partition_silence_s": []}
    for r, end in zip(restarts, ends, strict=True):
        firsts = _first_after(scene, r.back, set(scene.produced))
        drained = _first_after(scene, r.back, r.backlog, by=lambda source: source).values()
        figures["next_output_s"].append(round(min(firsts.values(), default=float("inf")), 2))
        figures["every_partition_s"].append(round(max(firsts.values(), default=float("inf")), 2))
        figures["backlog_drained_s"].append(round(max(drained, default=float("inf")), 2))
        figures["longest_partition_silence_s"].append(
            round(_longest_silence(scene, r.back, end), 2)
        )
    return figures


def _longest_silence(scene: Scene, start: float, end: float) -> float:
    """The longest time, from ``start`` to ``end`` (edges included), that one input partition
    wrote nothing."""
    times: dict[str, list[float]] = {f"{scene.topics['input']}/{p}": [] for p in range(PARTITIONS)}
    for when, source in scene.arrivals:
        if start <= when <= end:
            times.setdefault(_partition(source), []).append(when)
    return max(
        max(b - a for a, b in itertools.pairwise([start, *sorted(ts), end]))
        for ts in times.values()
    )


def _partition(source: str) -> str:
    return source.rsplit("/", 1)[0]


def _first_after(
    scene: Scene, since: float, sources: set[str], by: Callable[[str], str] = _partition
) -> dict[str, float]:
    """Per ``by(source)`` (default: input partition), the seconds from ``since`` to the first
    record, after ``since``, for one of ``sources``."""
    firsts: dict[str, float] = {}
    for when, source in scene.arrivals:
        if when >= since and source in sources:
            key = by(source)
            firsts[key] = min(firsts.get(key, when - since), when - since)
    return firsts


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def _account_unacked(result: Result, scene: Scene) -> None:
    """A produce request the broker wrote but whose ack the restart lost is sent again by the
    producer: an input offset we never heard of, holding an event already in the topic. Read the
    input topic back and hold every offset in it to account (the acked ones must all be there)."""
    stored = await input_records(scene, len(scene.produced))
    acked = set(scene.produced)
    missing = acked - stored.keys()
    extra = sorted(stored.keys() - acked)
    result.figures["written_unacked"] = len(extra)
    result.figures["inputs_written_twice"] = len(stored) - len(set(stored.values()))
    result.check("every acked input is in the topic", not missing, f"{len(missing)} missing")
    scene.produced += extra


async def input_records(scene: Scene, expect: int, quiet: float = 2.0) -> dict[str, bytes]:
    """Every record of the scene's input topic by ``topic/partition/offset`` (read from the
    start until ``expect`` are in and nothing more came for ``quiet`` seconds: Tansu's end
    offsets are unreliable)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=scene.kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: dict[str, bytes] = {}
    try:
        tps = [TopicPartition(scene.topics["input"], p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        await _read_until_quiet(consumer, found, expect, quiet)
    finally:
        await consumer.stop()
    return found


async def _read_until_quiet(
    consumer: AIOKafkaConsumer,
    found: dict[str, bytes],
    expect: int,
    quiet: float,
    timeout: float = 60,
) -> None:
    started = last = time.monotonic()
    while time.monotonic() - started < timeout:
        batches = await consumer.getmany(timeout_ms=200)
        for tp, records in batches.items():
            found.update({f"{tp.topic}/{tp.partition}/{r.offset}": r.value for r in records})
            last = time.monotonic()
        if len(found) >= expect and time.monotonic() - last > quiet:
            return
