"""Per-partition commit progress: lag, the oldest uncommitted offset, and when a partition is stuck.

Agents can die or stop committing while the process stays up (PITFALLS 7). A partition *has
work* while events of it are in flight or its commit lags its highwater; it is *stuck* when it
has had work for longer than :data:`STALL_AFTER` seconds without its committed offset moving.

:class:`ProgressWatch` is pure logic on an injected clock: the worker feeds it what it sees of
each assigned partition (every couple of seconds, and on every ``/health`` request); it keeps,
per partition, when the committed offset last moved and since when the partition has had work.
A quota that is spent holds events in flight on purpose, and counts as no progress too: use
``/health`` for alerting and readiness rather than as a liveness probe that restarts workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["STALL_AFTER", "PartitionState", "ProgressWatch"]

STALL_AFTER: Final = 60.0  # seconds with work and no committed progress before a partition is stuck

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class PartitionState:
    """One partition as this worker sees it. Offsets are Kafka positions (the next offset to
    read); ``lag`` is about ``highwater - committed`` (None when the highwater is unknown);
    ages are in seconds."""

    topic: str
    partition: int
    committed: int | None
    highwater: int | None
    lag: int | None
    in_flight: int
    oldest_offset: int | None  # lowest uncommitted offset being processed
    oldest_age: float | None  # how long that offset has been in flight
    stalled_for: float  # seconds with work and no committed progress (0 without work)
    stuck: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "committed": self.committed,
            "highwater": self.highwater,
            "lag": self.lag,
            "in_flight": self.in_flight,
            "oldest_offset": self.oldest_offset,
            "oldest_age": _round(self.oldest_age),
            "stalled_for": _round(self.stalled_for),
            "stuck": self.stuck,
        }


class _Seen:
    __slots__ = ("committed", "progress_at", "work_since")

    def __init__(self, committed: int | None, now: float) -> None:
        self.committed = committed
        self.progress_at = now
        self.work_since: float | None = None


class ProgressWatch:
    """Tells, per partition, how long it has had work without committed progress."""

    __slots__ = ("_clock", "_seen", "stall_after")

    def __init__(self, *, stall_after: float = STALL_AFTER, clock: Clock = time.monotonic) -> None:
        self.stall_after = stall_after
        self._clock = clock
        self._seen: dict[Hashable, _Seen] = {}

    def observe(
        self,
        topic: str,
        partition: int,
        *,
        committed: int | None,
        highwater: int | None,
        in_flight: int = 0,
        oldest: tuple[int, float] | None = None,
    ) -> PartitionState:
        """Record what is seen of one partition now; returns its state.

        ``committed``: the group's committed offset (None: nothing committed yet, taken as 0);
        ``highwater``: the offset the next produced record will get (None: unknown);
        ``oldest``: ``(offset, started)`` of its lowest in-flight offset, ``started`` on this
        watch's clock."""
        now = self._clock()
        key = (topic, partition)
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = _Seen(committed, now)
        elif committed != seen.committed:
            seen.committed, seen.progress_at = committed, now
        lag = max(0, highwater - (committed or 0)) if highwater is not None else None
        has_work = in_flight > 0 or bool(lag)
        stalled = 0.0
        if not has_work:
            seen.work_since = None
        else:
            if seen.work_since is None:  # work began; the oldest event may have begun earlier
                seen.work_since = min(now, oldest[1]) if oldest is not None else now
            stalled = max(0.0, now - max(seen.progress_at, seen.work_since))
        return PartitionState(
            topic=topic,
            partition=partition,
            committed=committed,
            highwater=highwater,
            lag=lag,
            in_flight=in_flight,
            oldest_offset=oldest[0] if oldest is not None else None,
            oldest_age=max(0.0, now - oldest[1]) if oldest is not None else None,
            stalled_for=stalled,
            stuck=stalled > self.stall_after,
        )

    def forget(self, keep: Iterable[tuple[str, int]]) -> None:
        """Drop the partitions not in ``keep`` (no longer assigned to this worker)."""
        wanted = set(keep)
        for key in [k for k in self._seen if k not in wanted]:
            del self._seen[key]


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None
