"""Bounded fan-out of events: many in flight, per-key order kept, acks released in offset order.

The worker's loop for a topic (:mod:`enricher.app`) hands every consumed record to
:meth:`Pipeline.submit`, one at a time. ``submit`` waits while ``in_flight`` events are already
being enriched, which is what bounds read-ahead. Each event runs as its own task: wait for the
previous event of its key, enrich, write the output or dead letter and wait for the broker's
acknowledgement, then mark the offset finished. Tokens (Faust events) are released to the
acker strictly in offset order per partition.

Writes of one partition also *begin* in offset order (an event enriched early waits for every
earlier offset's write to begin), so what is written is always a prefix of what is submitted: at a
stop or a revocation, events that have not begun writing are abandoned (never written), writes
that have begun are awaited and acked, and the commit then covers every output written.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from .config import TopicSettings
from .enrich import DeadLetter, Enriched, Enricher, Outcome
from .errors import CallError, ShuttingDown
from .ordering import KeySequencer, OffsetTracker
from .records import InputRecord, OutputRecord, dead_letter_record, output_for

__all__ = [
    "OutputTooLarge",
    "Pipeline",
    "PipelineStats",
    "ReplayHooks",
    "Sink",
    "SinkUnavailable",
]

T = TypeVar("T")
log = logging.getLogger(__name__)


class OutputTooLarge(Exception):
    """The broker refused a record as too large: the event becomes a dead letter instead."""


class SinkUnavailable(Exception):
    """The broker did not acknowledge a record; writing it again may succeed."""


class ReplayHooks(Protocol):
    """What the pipeline needs of the replay registry for replayed events."""

    async def is_cancelled(self, replay_id: str) -> bool: ...
    async def record_outcome(self, replay_id: str, kind: Any, count: int = 1) -> int: ...


class Sink(Protocol):
    """Where output and dead-letter records go; ``write`` returns once the broker has them."""

    async def write(self, record: OutputRecord) -> None: ...


@dataclass(slots=True)
class PipelineStats:
    """Counters since start (for status, metrics and tests)."""

    submitted: int = 0
    outputs: int = 0
    dead_letters: int = 0
    dropped: int = 0
    abandoned: int = 0
    cancelled: int = 0  # replayed events of a cancelled replay: acked without output
    dead_letters_by_kind: dict[str, int] = field(default_factory=dict)


class Pipeline(Generic[T]):
    """Enriches submitted records concurrently and releases their tokens in offset order."""

    def __init__(
        self,
        *,
        enricher: Enricher,
        sink: Sink,
        topics: TopicSettings,
        in_flight: int,
        release: Callable[[T], Awaitable[None]],
        replays: ReplayHooks | None = None,
        write_retry_delay: float = 1.0,
        cancel_poll: float = 0.1,
        write_wait: float = 2.0,
    ) -> None:
        self._enricher = enricher
        self._sink = sink
        self._topics = topics
        self._release = release
        self._write_retry_delay = write_retry_delay
        self._replays = replays
        self._cancel_poll = cancel_poll
        self._slots = asyncio.Semaphore(in_flight)
        self._tracker: OffsetTracker[T] = OffsetTracker()
        self._keys = KeySequencer()
        self._writes = KeySequencer()  # per partition: writes begin in offset order
        self._write_wait = write_wait  # how long begun writes get once events are abandoned
        self._writing: set[asyncio.Task[None]] = set()
        self._tasks: dict[asyncio.Task[None], Hashable] = {}  # running task -> its partition
        self._to_release: deque[T] = deque()
        self._releasing = False
        self._closing = False
        self.stats = PipelineStats()

    @property
    def tracker(self) -> OffsetTracker[T]:
        """In-flight offsets per partition (read-only use: status and health)."""
        return self._tracker

    async def submit(
        self, record: InputRecord, token: T, current: Callable[[], bool] | None = None
    ) -> bool:
        """Start enriching ``record``; waits while ``in_flight`` events are already running.

        Call in consumption order (one caller): offsets and key order are registered here.
        Raises ShuttingDown once :meth:`close` has begun; the record then stays unacked.
        ``current`` is asked once a slot is free: False (its partition was revoked meanwhile)
        drops the record unacked, and ``submit`` returns False.
        """
        await self._slots.acquire()
        if self._closing:
            self._slots.release()
            raise ShuttingDown("pipeline is closing")
        if current is not None and not current():
            self._slots.release()
            return False
        tp = (record.topic, record.partition)
        epoch = self._tracker.start(tp, record.offset, token)
        previous, turn = self._keys.enter(record.key)
        written = self._writes.enter(tp)
        self.stats.submitted += 1
        task = asyncio.create_task(self._run(record, tp, epoch, (previous, turn), written))
        self._tasks[task] = tp
        task.add_done_callback(self._forget_task)
        return True

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def revoke(self, tps: Iterable[Hashable], wait: float = 0.0) -> None:
        """Partitions are being taken away: give their in-flight events ``wait`` seconds to
        finish (and be acked), abandon the rest (writes already begun are awaited), then forget
        the partitions: nothing of theirs is acked by us afterwards. Call before the commit
        that precedes the revocation."""
        revoked = set(tps)
        tasks = {task for task, tp in self._tasks.items() if tp in revoked}
        if tasks and wait > 0:
            await asyncio.wait(tasks, timeout=wait)
        await self._abandon(tasks)
        self._tracker.forget(revoked)

    async def close(self, grace: float) -> None:
        """Stop taking events; give running ones ``grace`` seconds to finish, abandon the rest.

        Abandoned events are never written nor acked, so they are processed again after a
        restart; writes already begun get up to ``write_wait`` more seconds to be acknowledged.
        """
        self._closing = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        await self._abandon(set(self._tasks))

    async def _abandon(self, tasks: set[asyncio.Task[None]]) -> None:
        """Cancel ``tasks`` that have not begun writing; let begun writes finish (and ack)
        within ``write_wait`` seconds, then cancel those too."""
        for task in tasks:
            if task not in self._writing:
                task.cancel()
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self._write_wait)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self,
        record: InputRecord,
        tp: Hashable,
        epoch: int,
        key_turn: tuple[asyncio.Future[bool] | None, asyncio.Future[bool]],
        write_turn: tuple[asyncio.Future[bool] | None, asyncio.Future[bool]],
    ) -> None:
        """Enrich, then (once every earlier offset of the partition has begun writing) write;
        once the output or dead letter is acknowledged, release what is now in order. One
        coroutine, not two: every wait of the event passes through one frame less."""
        task = cast(asyncio.Task[None], asyncio.current_task())
        (previous, turn), (previous_write, my_write) = key_turn, write_turn
        completed = False
        try:
            if await _completed(previous):
                outcome = await self._enrich(record)
                if await _completed(previous_write):
                    self._writing.add(task)  # _abandon lets it finish from here on
                    self._writes.leave(tp, my_write, completed=True)
                    if outcome is not None:
                        kind = outcome.error.kind if isinstance(outcome, DeadLetter) else None
                        await self._write(output_for(record, outcome, self._topics), record, kind)
                    await self._record_replay_outcome(record, outcome)
                    completed = True
        except (ShuttingDown, asyncio.CancelledError):
            pass  # left unacked: it will be consumed again
        except Exception:  # a bug; never let it kill the loop or lose the event silently
            log.exception("unexpected error enriching %s; left unacked", record.source)
        finally:
            self._keys.leave(record.key, turn, completed=completed)
            self._writes.leave(tp, my_write, completed=False)  # no-op once writing began
            self._slots.release()
            if not completed:
                self.stats.abandoned += 1
        try:
            if completed:
                await self._release_in_order(self._tracker.finish(tp, record.offset, epoch))
        finally:
            self._writing.discard(task)

    def _enrich(self, record: InputRecord) -> Awaitable[Outcome | None]:
        """The event's outcome; None when its replay was cancelled (no output, no more calls).
        A live event's is the enricher's own coroutine: no frame of ours between its waits
        and the event's task."""
        replay_id, replays = record.replay_id, self._replays
        if replay_id is None or replays is None:
            return self._enricher.enrich(record.value, record.lane)
        return self._enrich_replayed(record, replay_id, replays)

    async def _enrich_replayed(
        self, record: InputRecord, replay_id: str, replays: ReplayHooks
    ) -> Outcome | None:
        if await replays.is_cancelled(replay_id):
            return None
        work = asyncio.ensure_future(self._enricher.enrich(record.value, record.lane))
        try:
            while True:  # a cancel stops this event's calls within a poll
                done, _ = await asyncio.wait({work}, timeout=self._cancel_poll)
                if done:
                    return work.result()
                if await replays.is_cancelled(replay_id):
                    work.cancel()
                    return None
        finally:
            work.cancel()

    async def _record_replay_outcome(self, record: InputRecord, outcome: Outcome | None) -> None:
        if record.replay_id is None or self._replays is None:
            return
        kind = _replay_outcome_kind(outcome)
        if outcome is None:
            self.stats.cancelled += 1
        try:
            await self._replays.record_outcome(record.replay_id, kind)
        except Exception as exc:  # progress figures only: never fail the event for them
            log.warning("could not record replay progress: %s", type(exc).__name__)

    async def _write(self, out: OutputRecord | None, record: InputRecord, kind: str | None) -> None:
        """Write until the broker acknowledges; an oversized output becomes a dead letter."""
        if out is None:
            self.stats.dropped += 1
            return
        try:
            await self._write_until_acked(out)
        except OutputTooLarge:
            error = CallError("bad_response", f"output record of {len(out.value)} bytes too large")
            out = dead_letter_record(record, input_event(record), error, self._topics)
            await self._write_until_acked(out)
            kind = error.kind
        self._count(kind)

    async def _write_until_acked(self, out: OutputRecord) -> None:
        while True:
            try:
                await self._sink.write(out)
                return
            except SinkUnavailable as exc:
                log.warning("write to %s failed (%s); retrying", out.topic, exc)
                await asyncio.sleep(self._write_retry_delay)

    def _count(self, dead_letter_kind: str | None) -> None:
        if dead_letter_kind is None:
            self.stats.outputs += 1
            return
        kind = dead_letter_kind
        self.stats.dead_letters += 1
        self.stats.dead_letters_by_kind[kind] = self.stats.dead_letters_by_kind.get(kind, 0) + 1

    async def _release_in_order(self, tokens: list[T]) -> None:
        # finish() hands out disjoint prefixes in offset order; one drainer keeps them in order
        # even if an acker were to suspend.
        self._to_release.extend(tokens)
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._to_release:
                await self._release(self._to_release.popleft())
        finally:
            self._releasing = False


async def _completed(turn: asyncio.Future[bool] | None) -> bool:
    """Whether the predecessor whose ``turn`` this is completed (True: there is none). Awaited
    through a shield: our cancellation must not cancel its turn (no shield once it is done)."""
    if turn is None:
        return True
    if turn.done():
        return turn.result()
    return await asyncio.shield(turn)


def _replay_outcome_kind(outcome: Outcome | None) -> str:
    """The replay registry's counter an outcome adds to."""
    if outcome is None:
        return "cancelled_events"
    if isinstance(outcome, Enriched):
        return "outputs"
    return "dead_letters" if isinstance(outcome, DeadLetter) else "dropped"


def input_event(record: InputRecord) -> dict[str, Any] | str:
    """The input as the dead-letter ``event`` field: the object, or the raw text."""
    text = (record.value or b"").decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text
