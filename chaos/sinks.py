"""Scenario: an output record too large for the broker."""

from __future__ import annotations

import asyncio
import json
import time

from .scenario import Result, api, finish
from .stack import ChaosStack, Scene

__all__ = ["output_too_large"]

HUGE_ANSWER = 1_500_000  # bytes of API answer: the output record is over the producer's 1 MB


async def output_too_large(stack: ChaosStack, scale: float) -> Result:
    """Events whose enriched output is too large for the broker become dead letters, the events
    after them go on, and every offset is committed only once its record is written."""
    del scale
    result = Result("output-too-large")
    scene = Scene(stack, "output")
    rule = {"when": {"type": "big"}, "api": "big", "params": {"size": "size"}, "into": "big"}
    scene.config({"big": api("/big/{size}", 20.0, 5, max_response_bytes="4MiB")}, [rule])
    await scene.start()
    scene.start_worker()
    try:
        sizes = [100, 100, HUGE_ANSWER, 100, HUGE_ANSWER, 100, 100]
        records = [(b"one-key", json.dumps({"type": "big", "size": n}).encode()) for n in sizes]
        await scene.produce(records)  # one key: one partition, in this order
        await scene.drain(60)
        acc = finish(result, scene, {"/big/": (20.0, 5)}, allow_dead_letters=True)
        big = sizes.count(HUGE_ANSWER)
        result.check(
            "too-large outputs are dead letters",
            acc.dead_lettered == big and acc.outputs == len(sizes) - big,
            f"{acc.dead_lettered} dead letters ({dict(acc.dead_letters)}), {acc.outputs} outputs",
        )
        ends, committed = scene.produced_ends(), await _committed_soon(scene)
        result.check(
            "every offset committed after its record",
            committed == ends,
            f"committed {committed}, produced up to {ends}",
        )
    finally:
        await scene.close()
    return result


async def _committed_soon(scene: Scene, timeout: float = 10.0) -> dict[int, int]:
    """The committed offsets once they reach the produced ends (or as they are at ``timeout``)."""
    started, ends = time.monotonic(), scene.produced_ends()
    while True:
        committed = await scene.committed()
        if committed == ends or time.monotonic() - started > timeout:
            return committed
        await asyncio.sleep(0.5)
