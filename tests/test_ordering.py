"""OffsetTracker and KeySequencer: acks only in offset order, one event per key at a time."""

from __future__ import annotations

import asyncio

from enricher.ordering import KeySequencer, OffsetTracker


def test_slow_offset_zero_holds_every_later_ack() -> None:
    # PITFALLS 2: acks of 1..3 must not let a commit pass an unfinished 0.
    tracker: OffsetTracker[str] = OffsetTracker()
    epochs = {o: tracker.start("p0", o, f"e{o}") for o in range(4)}
    assert tracker.finish("p0", 1, epochs[1]) == []
    assert tracker.finish("p0", 3, epochs[3]) == []
    assert tracker.finish("p0", 2, epochs[2]) == []
    assert tracker.oldest() == {"p0": 0}
    assert tracker.finish("p0", 0, epochs[0]) == ["e0", "e1", "e2", "e3"]
    assert tracker.in_flight() == 0


def test_partitions_are_independent() -> None:
    tracker: OffsetTracker[int] = OffsetTracker()
    a0 = tracker.start("a", 10, 10)
    b0 = tracker.start("b", 5, 5)
    a1 = tracker.start("a", 11, 11)
    assert tracker.finish("a", 11, a1) == []
    assert tracker.finish("b", 5, b0) == [5]
    assert tracker.finish("a", 10, a0) == [10, 11]


def test_forgotten_partition_releases_nothing_even_when_reassigned() -> None:
    tracker: OffsetTracker[int] = OffsetTracker()
    old = tracker.start("p", 0, 0)
    tracker.forget(["p"])
    new = tracker.start("p", 0, 100)  # the same offset consumed again after reassignment
    assert tracker.finish("p", 0, old) == []  # the stale task must not ack the new one
    assert tracker.in_flight("p") == 1
    assert tracker.finish("p", 0, new) == [100]


async def test_same_key_runs_in_order_other_keys_overlap() -> None:
    seq = KeySequencer()
    log: list[str] = []
    gate = asyncio.Event()

    async def work(key: str, name: str, wait: bool) -> None:
        previous, turn = seq.enter(key)
        try:
            if previous is not None:
                await previous
            log.append(f"start {name}")
            if wait:
                await gate.wait()
            log.append(f"end {name}")
        finally:
            seq.leave(key, turn, completed=True)

    tasks = [
        asyncio.create_task(work("k", "a1", True)),
        asyncio.create_task(work("k", "a2", False)),
        asyncio.create_task(work("j", "b1", False)),
    ]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert log == ["start a1", "start b1", "end b1"]  # a2 waits for a1; b1 does not
    gate.set()
    await asyncio.gather(*tasks)
    assert log[3:] == ["end a1", "start a2", "end a2"]
    assert len(seq) == 0  # no key left behind


async def test_abandoned_predecessor_is_reported_to_successor() -> None:
    seq = KeySequencer()
    _, first = seq.enter("k")
    previous, second = seq.enter("k")
    seq.leave("k", first, completed=False)
    assert previous is not None and (await previous) is False
    seq.leave("k", second, completed=False)
    assert len(seq) == 0
