"""Completion tracking that keeps commits safe and per-key order intact while events overlap.

Faust commits the highest *contiguous* acked offset, but its gap check is skipped while a
partition's committed offset is 0 (PITFALLS 2). So we never hand Faust an ack out of order:
:class:`OffsetTracker` releases an event only when it and every earlier offset of its partition
are finished. :class:`KeySequencer` makes events of one key run one after another.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["KeySequencer", "OffsetTracker", "PartitionKey"]

T = TypeVar("T")
PartitionKey = Hashable  # a Faust TP, or any hashable naming one partition


class _Partition(Generic[T]):
    """In-flight offsets of one partition, in arrival order, with their finished flags."""

    __slots__ = ("epoch", "pending")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        # offset -> [token, finished, started]; insertion order is offset order (Kafka delivers
        # in order); ``started`` is the tracker's clock when the offset was registered
        self.pending: OrderedDict[int, list[object]] = OrderedDict()


class OffsetTracker(Generic[T]):
    """Releases finished events in offset order, per partition.

    ``start`` registers an offset as in flight and returns an epoch; ``finish`` marks it done and
    returns the tokens that may now be acked (the finished prefix). ``forget`` drops a partition
    (revoked): late ``finish`` calls carrying the old epoch release nothing. ``clock`` (monotonic
    seconds) times when each offset started and when a partition last released one (health).
    """

    __slots__ = ("_clock", "_epochs", "_partitions", "_released")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._partitions: dict[PartitionKey, _Partition[T]] = {}
        self._epochs: dict[PartitionKey, int] = {}
        # tp -> (the offset after the last released one, when it was released)
        self._released: dict[PartitionKey, tuple[int, float]] = {}

    def start(self, tp: PartitionKey, offset: int, token: T) -> int:
        """Register ``offset`` of ``tp`` as in flight; returns the epoch to pass to ``finish``."""
        part = self._partitions.get(tp)
        if part is None:
            part = self._partitions[tp] = _Partition(self._epochs.get(tp, 0))
        part.pending[offset] = [token, False, self._clock()]
        return part.epoch

    def finish(self, tp: PartitionKey, offset: int, epoch: int) -> list[T]:
        """Mark ``offset`` finished; return the tokens now releasable, lowest offset first."""
        part = self._partitions.get(tp)
        if part is None or part.epoch != epoch or offset not in part.pending:
            return []
        part.pending[offset][1] = True
        released: list[T] = []
        while part.pending:
            first_offset, first = next(iter(part.pending.items()))
            if not first[1]:
                break
            part.pending.popitem(last=False)
            released.append(first[0])  # type: ignore[arg-type]
            self._released[tp] = (first_offset + 1, self._clock())
        return released

    def forget(self, tps: Iterable[PartitionKey]) -> None:
        """Drop the given partitions (revoked); their in-flight events will never be released."""
        for tp in tps:
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
            self._partitions.pop(tp, None)
            self._released.pop(tp, None)

    def in_flight(self, tp: PartitionKey | None = None) -> int:
        """Events started and not yet released (for one partition, or all)."""
        if tp is not None:
            part = self._partitions.get(tp)
            return len(part.pending) if part else 0
        return sum(len(p.pending) for p in self._partitions.values())

    def oldest(self) -> dict[PartitionKey, int]:
        """The lowest unreleased offset of every partition with events in flight."""
        return {tp: next(iter(p.pending)) for tp, p in self._partitions.items() if p.pending}

    def oldest_since(self) -> dict[PartitionKey, tuple[int, float]]:
        """``(offset, started)`` of the lowest unreleased offset of every partition with events
        in flight; ``started`` is on the tracker's clock."""
        found: dict[PartitionKey, tuple[int, float]] = {}
        for tp, part in self._partitions.items():
            if part.pending:
                offset, entry = next(iter(part.pending.items()))
                found[tp] = (offset, float(entry[2]))  # type: ignore[arg-type]
        return found

    def released(self) -> dict[PartitionKey, tuple[int, float]]:
        """Per partition: the offset after the last one released (what a commit would store)
        and when it was released, on the tracker's clock."""
        return dict(self._released)


class KeySequencer:
    """Runs work for the same key one at a time, in submission order; other keys overlap."""

    __slots__ = ("_tails",)

    def __init__(self) -> None:
        self._tails: dict[Hashable, asyncio.Future[bool]] = {}

    def enter(
        self, key: Hashable | None
    ) -> tuple[asyncio.Future[bool] | None, asyncio.Future[bool]]:
        """Take a place in ``key``'s line: returns (the predecessor to await, our own turn).

        Call synchronously, in input order. ``None`` keys are unordered (Kafka gives them no
        order either). The predecessor's result says whether it completed; if it did not
        (abandoned at shutdown or revocation), its successors must not complete either, or the
        key's outputs would come out of order when it is processed again.
        Pass the returned turn to :meth:`leave` when done, whatever happened.
        """
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if key is None:
            return None, turn
        previous = self._tails.get(key)
        self._tails[key] = turn
        return previous, turn

    def leave(self, key: Hashable | None, turn: asyncio.Future[bool], *, completed: bool) -> None:
        """End our turn: the next event of the key may go (``completed``: our output is written)."""
        if not turn.done():
            turn.set_result(completed)
        if key is not None and self._tails.get(key) is turn:
            del self._tails[key]

    def __len__(self) -> int:
        return len(self._tails)
