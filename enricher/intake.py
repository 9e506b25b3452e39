"""Events of a topic straight from Faust's conductor, taken in batches: no Faust stream per event.

A Faust agent reads each event through a stream: a queue get that waits on two futures, a
``sleep(0)``, sensors and a context variable per event, then our own loop hands the event on.
That machinery is a large part of a Faust worker's CPU per event (bench: an agent that only
forwards costs 0.24 ms per event, about what a whole enrichment costs without it; see the
README's Benchmarks). :class:`Intake` subscribes a
clone of the topic with an :class:`IntakeQueue` in place of the stream's queue: the conductor
decodes each message and appends the event (still Faust's: acking it is Faust's ack, so commits
are unchanged), and one task takes everything queued at once.

Faust's stream also skips events read before a rebalance (another generation) or while flow
control is off (mid-rebalance): :meth:`Intake.batches` does the same, leaving them unacked; the
consumer seeks every assigned partition back to its committed offset after a rebalance.

:func:`deliver_directly` removes the other per-message cost, in Faust's consumer loop itself.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from mode.services import WaitResults

__all__ = [
    "FETCH_LONG_POLL",
    "LIVE_HOLD",
    "REPLAY_HOLD",
    "Intake",
    "IntakeQueue",
    "deliver_directly",
]

# Faust's fetch loop long-polls the broker for up to 1.5 s (``fetch_max_wait_ms=1500`` in its
# aiokafka driver), one request in flight per broker: a partition resumed meanwhile waits for it.
FETCH_LONG_POLL = 1.5
# The live queue pauses only for a worker that takes longer than a long poll to submit one
# batch: it then has more than a long poll's work in hand, and the pause costs it nothing. A
# shorter hold paused a fast worker on a hiccup (a slow call holding its partition's writes),
# and the poll that followed left it without events for up to 1.5 s (bench: 0.5 s gaps in
# 2.5 s runs, a sixth of the throughput).
LIVE_HOLD = 2.0
# A replay's queue pauses quickly: while the conductor is held, live events wait with it. A
# replay that keeps up (a warm one) takes its batches well within this and is never paused.
REPLAY_HOLD = 0.25


class IntakeQueue:
    """The queue Faust's conductor fills for one subscribed channel, emptied a batch at a time.

    It offers what the conductor calls: ``full``, ``put_nowait_enhanced`` and ``put`` (awaited
    when full, which holds the conductor, and so the fetch loop of every topic, until the worker
    takes the batch). A full queue holds the fetch loop for at most ``hold`` seconds: a worker
    that takes longer is slow (a replay held to its share), and rather than make every other
    topic wait with it, the queue stops the fetching of its partitions (Faust's pressure
    callbacks, which each put hands over) and takes what the fetch loop already has in hand. It
    resumes them when the worker takes the batch. A pause has a price: a resumed partition is
    fetched again only after the fetch loop's long poll in flight returns (up to
    :data:`FETCH_LONG_POLL`), so a queue should pause only when its worker has more work in hand
    than that (see :data:`LIVE_HOLD` and :data:`REPLAY_HOLD`).
    """

    def __init__(self, maxsize: int, hold: float) -> None:
        if maxsize < 1 or hold < 0:
            raise ValueError(f"maxsize must be >= 1 and hold >= 0, got {maxsize} and {hold}")
        self.maxsize = maxsize
        self.hold = hold
        self._items: deque[Any] = deque()
        self._filled = asyncio.Event()  # something to take
        self._emptied = asyncio.Event()  # room again
        # Per partition (one pair of callbacks each): stop fetching it, fetch it again.
        self._pressure: dict[Callable[[], None], Callable[[], None]] = {}
        self.paused = False

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return len(self._items) >= self.maxsize and not self.paused

    def put_nowait_enhanced(
        self,
        value: Any,
        *,
        on_pressure_high: Callable[[], None] | None = None,
        on_pressure_drop: Callable[[], None] | None = None,
    ) -> None:
        """Append ``value``, remembering how to pause and resume its partition."""
        if on_pressure_high is not None and on_pressure_drop is not None:
            self._pressure.setdefault(on_pressure_high, on_pressure_drop)
        self._items.append(value)
        self._filled.set()

    async def put(self, value: Any) -> None:
        """Append ``value`` once there is room, or once ``hold`` seconds have passed (then the
        queue's partitions are paused until the worker takes the batch)."""
        try:
            async with asyncio.timeout(self.hold):
                while self.full():
                    self._emptied.clear()
                    await self._emptied.wait()
        except TimeoutError:
            self._pause()
        self.put_nowait_enhanced(value)

    async def take(self) -> list[Any]:
        """Everything queued, waiting until something is; paused partitions resume."""
        while not self._items:
            self._filled.clear()
            await self._filled.wait()
        batch = list(self._items)
        self._items.clear()
        self._emptied.set()
        self._resume()
        self._pressure.clear()  # the next pause is of the partitions that fill it next
        return batch

    def _pause(self) -> None:
        if self.paused:
            return
        self.paused = True
        for on_pressure_high in self._pressure:
            on_pressure_high()

    def _resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        for on_pressure_drop in self._pressure.values():
            on_pressure_drop()


class Intake:
    """One topic's events for one worker loop, in batches (see the module docstring); ``hold``
    as in :class:`IntakeQueue`."""

    def __init__(self, app: Any, topic: Any, maxsize: int, *, hold: float) -> None:
        self._app = app
        self.queue = IntakeQueue(maxsize, hold)
        self.channel = topic.clone_using_queue(self.queue)
        app.topics.add(self.channel)  # the consumer subscribes to what the conductor holds

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Batches of events as the conductor delivered them (offset order per partition),
        without the events Faust's stream would skip."""
        app = self._app
        while True:
            batch = await self.queue.take()
            if not app.flow_control.is_active():
                continue  # mid-rebalance: all of it is read again from the committed offsets
            generation = app.consumer_generation_id
            if current := [event for event in batch if event.message.generation_id == generation]:
                _seen_by_stream(app, current)
                yield current


def _seen_by_stream(app: Any, events: list[Any]) -> None:
    """Tell Faust's monitor that these partitions' events are being processed, as a stream's
    sensor would: its consumer logs "stream has not started processing" errors for a partition
    with a backlog whose last inbound event is older than ``stream_processing_timeout``."""
    monitor = getattr(app, "monitor", None)
    if monitor is None:
        return
    now = time.monotonic()
    for tp in {event.message.tp for event in events}:
        monitor.stream_inbound_time[tp] = now


def deliver_directly(consumer: Any) -> None:
    """Make Faust's ``consumer`` hand each message to the conductor with a plain ``await``.

    Its fetch loop awaits every delivery as ``wait_first(delivery, suspend_flow.wait())``, so that
    a rebalance (which sets ``suspend_flow``) need not wait for a delivery held by a full buffer:
    four tasks and an ``asyncio.wait`` per message, about a fifth of a busy worker's CPU (bench).
    While the flow is not suspended, this awaits the delivery alone. A delivery into an
    :class:`IntakeQueue` waits only while the queue is full, and the worker loop keeps emptying
    it during a rebalance (it drops the revoked events), so a rebalance never waits on one; the
    consumer's stop cancels the loop as before. Any other call goes to Faust's ``wait_first``.
    """
    faust_wait_first = consumer.wait_first
    suspend_flow = consumer.suspend_flow

    async def wait_first(*coros: Any, timeout: Any = None) -> Any:
        if timeout is None and len(coros) == 2 and not suspend_flow.is_set():
            delivery, suspended = coros
            if inspect.iscoroutine(delivery) and _waits_on(suspended, suspend_flow):
                suspended.close()  # never started: nothing to undo
                return WaitResults([delivery], [await delivery], False)
        return await faust_wait_first(*coros, timeout=timeout)

    consumer.wait_first = wait_first


def _waits_on(coro: Any, event: Any) -> bool:
    """Whether ``coro`` is ``event.wait()``, not started yet."""
    frame = getattr(coro, "cr_frame", None)
    return (
        inspect.iscoroutine(coro)
        and coro.cr_code is type(event).wait.__code__
        and frame is not None
        and frame.f_locals.get("self") is event
    )
