"""The broker restarted under load: Tansu on S3 storage (a moto server), so it comes back with its
topics, records and committed offsets, on the same port; the workers are never restarted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from aiokafka import AIOKafkaConsumer, TopicPartition

from enricher.services import EmbeddedKafka, EmbeddedS3

from .outages import IN_FLIGHT, LIMITS, RATE
from .scenario import Result, api, finish, geo_rule, page_view
from .stack import PARTITIONS, ChaosStack, Scene, say

__all__ = ["broker_restart", "input_records"]

WORKERS = 2
LOAD = 30.0  # events/s, under the API's 50/s


async def broker_restart(stack: ChaosStack, scale: float) -> Result:
    """Two workers at 30 events/s; the broker is stopped (SIGTERM), then crashed (SIGKILL), each
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


async def _run(result: Result, scene: Scene, kafka: EmbeddedKafka, outage: float) -> None:
    await scene.produce(page_view(i) for i in range(5))
    await scene.wait_for("first output", lambda: bool(scene.seen), 60)
    restarts: list[dict[str, object]] = []

    async def restart(how: str, stop: Callable[[], None]) -> tuple[float, int]:
        before = await scene.committed()
        say(f"  broker {how}, down for {outage:g} s")
        await asyncio.to_thread(stop)
        await asyncio.sleep(outage)
        await kafka.astart()
        back, acked = time.time(), len(scene.produced)
        say("  broker back on the same port")
        after = await scene.committed()
        kept = all(after.get(p, -1) >= offset for p, offset in before.items())
        restarts.append({"how": how, "committed_before": before, "committed_after": after})
        result.check(
            f"committed offsets kept across the {how}",
            kept and bool(before),
            f"{before} -> {after}",
        )
        return back, acked

    async def outages() -> list[tuple[float, int]]:
        await asyncio.sleep(6)
        first = await restart("SIGTERM", kafka.stop)
        await asyncio.sleep(8)
        return [first, await restart("SIGKILL", kafka.kill)]

    task = asyncio.ensure_future(outages())
    with _quiet("aiokafka"):  # our producer and tail log every failed reconnect
        await scene.produce_paced(lambda i: page_view(i + 5), LOAD, 2 * outage + 22)
        backs = await task
    await scene.drain(120)
    nexts = [_first_after(scene, back, set(scene.produced)) for back, _ in backs]
    resumed = [_first_after(scene, back, set(scene.produced[n:])) for back, n in backs]
    await _account_unacked(result, scene)
    finish(result, scene, LIMITS, allow_duplicates=len(backs) * 2 * WORKERS * IN_FLIGHT)
    result.recover_s = max(min(firsts.values(), default=float("inf")) for firsts in nexts)
    every = [max(firsts.values(), default=float("inf")) for firsts in resumed]
    result.figures |= {
        "outage_s": outage,
        "next_output_s": [round(min(f.values(), default=float("inf")), 2) for f in nexts],
        "every_partition_output_s": [round(max(f.values(), default=-1), 2) for f in nexts],
        "every_partition_resumed_s": [round(s, 2) for s in every],
        "restarts": restarts,
    }
    partitions = len(resumed[-1])
    result.check(
        "every partition resumes, no worker restarted",
        partitions == PARTITIONS and len(scene.workers) == WORKERS,
        f"{partitions}/{PARTITIONS} input partitions output an input written after the last "
        f"restart, the last {max(every):.1f} s after it",
    )


def _first_after(scene: Scene, since: float, sources: set[str]) -> dict[str, float]:
    """Per input partition, the seconds from ``since`` to its first record (after ``since``) for
    one of ``sources``."""
    firsts: dict[str, float] = {}
    for when, source in scene.arrivals:
        partition = source.rsplit("/", 1)[0]
        if when >= since and source in sources:
            firsts[partition] = min(firsts.get(partition, when - since), when - since)
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
