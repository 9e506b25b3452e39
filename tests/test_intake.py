"""The batched intake in place of a Faust stream: queue semantics and what it skips, as Faust's
stream does (the real conductor path runs in every worker test)."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import faust
import pytest
from mode.utils.locks import Event as ModeEvent

from enricher.app import create_app
from enricher.config import config_from_dict
from enricher.intake import (
    FETCH_LONG_POLL,
    LIVE_HOLD,
    REPLAY_HOLD,
    Intake,
    IntakeQueue,
    deliver_directly,
)


@dataclass
class Message:
    offset: int
    generation_id: int = 1

    @property
    def tp(self) -> tuple[str, int]:
        return ("in", self.offset % 2)


@dataclass
class Event:
    message: Message


@dataclass
class FlowControl:
    active: bool = True

    def is_active(self) -> bool:
        return self.active


@dataclass
class Topics:
    added: list[Any] = field(default_factory=list)

    def add(self, channel: Any) -> None:
        self.added.append(channel)


@dataclass
class Monitor:
    stream_inbound_time: dict[Any, float] = field(default_factory=dict)


@dataclass
class App:
    flow_control: FlowControl = field(default_factory=FlowControl)
    consumer_generation_id: int = 1
    topics: Topics = field(default_factory=Topics)
    monitor: Monitor = field(default_factory=Monitor)


class Topic:
    def clone_using_queue(self, queue: IntakeQueue) -> tuple[str, IntakeQueue]:
        return ("channel", queue)


def events(*offsets: int, generation: int = 1) -> list[Event]:
    return [Event(Message(offset, generation)) for offset in offsets]


async def test_take_returns_everything_queued_in_order_and_waits_when_empty() -> None:
    queue = IntakeQueue(10, hold=REPLAY_HOLD)
    for value in (1, 2, 3):
        queue.put_nowait_enhanced(value, on_pressure_high=None, on_pressure_drop=None)
    assert await queue.take() == [1, 2, 3]
    assert queue.empty()
    waiting = asyncio.ensure_future(queue.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put_nowait_enhanced(4)
    assert await asyncio.wait_for(waiting, 1) == [4]


async def test_put_holds_while_full_until_a_batch_is_taken() -> None:
    queue = IntakeQueue(2, hold=REPLAY_HOLD)
    queue.put_nowait_enhanced(1)
    queue.put_nowait_enhanced(2)
    assert queue.full()
    held = asyncio.ensure_future(queue.put(3))
    await asyncio.sleep(0)
    assert not held.done() and queue.full()
    assert await queue.take() == [1, 2]
    await asyncio.wait_for(held, 1)
    assert await queue.take() == [3]


async def test_a_slow_taker_gets_its_partitions_paused_instead_of_holding_the_fetch_loop() -> None:
    queue = IntakeQueue(2, hold=0.05)
    calls: list[str] = []
    p0 = (partial(calls.append, "pause p0"), partial(calls.append, "resume p0"))
    p1 = (partial(calls.append, "pause p1"), partial(calls.append, "resume p1"))
    queue.put_nowait_enhanced(1, on_pressure_high=p0[0], on_pressure_drop=p0[1])
    queue.put_nowait_enhanced(2, on_pressure_high=p1[0], on_pressure_drop=p1[1])
    assert queue.full()
    await asyncio.wait_for(queue.put(3), 1)  # nobody takes: held for ``hold``, then paused
    assert calls == ["pause p0", "pause p1"] and queue.paused
    assert not queue.full()  # what the fetch loop has in hand goes in without a wait
    queue.put_nowait_enhanced(4, on_pressure_high=p0[0], on_pressure_drop=p0[1])
    assert await queue.take() == [1, 2, 3, 4]
    assert calls == ["pause p0", "pause p1", "resume p0", "resume p1"] and not queue.paused
    # the next pause stops only the partitions that filled the queue since
    queue.put_nowait_enhanced(5, on_pressure_high=p1[0], on_pressure_drop=p1[1])
    queue.put_nowait_enhanced(6, on_pressure_high=p1[0], on_pressure_drop=p1[1])
    await asyncio.wait_for(queue.put(7), 1)
    assert calls[4:] == ["pause p1"]


def test_the_live_queue_holds_longer_than_fausts_long_poll_and_a_replays_pauses_sooner() -> None:
    # A paused partition is fetched again only once the long poll in flight returns: a live
    # queue that paused on a hiccup left a fast worker without events for up to that long.
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    source = inspect.getsource(AIOKafkaConsumerThread._create_worker_consumer)
    assert f"fetch_max_wait_ms={round(FETCH_LONG_POLL * 1000)}," in source
    assert REPLAY_HOLD < FETCH_LONG_POLL < LIVE_HOLD
    app = create_app(config_from_dict({}), web_port=7001)
    assert app._live_intake.queue.hold == LIVE_HOLD
    assert app._replay_intake.queue.hold == REPLAY_HOLD


def test_a_queue_needs_room_for_one() -> None:
    with pytest.raises(ValueError, match=r"maxsize must be >= 1 and hold >= 0, got 0 and 0\.25"):
        IntakeQueue(0, hold=REPLAY_HOLD)


async def test_intake_subscribes_its_channel_and_skips_what_a_faust_stream_skips() -> None:
    app = App()
    intake = Intake(app, Topic(), maxsize=10, hold=LIVE_HOLD)
    assert app.topics.added == [("channel", intake.queue)]
    batches = intake.batches()
    intake.queue.put_nowait_enhanced(events(0, generation=0)[0])  # read before a rebalance
    for event in events(1, 2):
        intake.queue.put_nowait_enhanced(event)
    assert [e.message.offset for e in await anext(batches)] == [1, 2]
    # Faust's monitor sees its partitions processed, as a stream's sensor would tell it
    assert set(app.monitor.stream_inbound_time) == {("in", 0), ("in", 1)}
    app.flow_control.active = False  # mid-rebalance: read again from the committed offsets
    intake.queue.put_nowait_enhanced(events(3)[0])
    pending = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0)
    assert not pending.done() and intake.queue.empty()  # taken and dropped, nothing yielded
    app.flow_control.active = True
    app.consumer_generation_id = 2
    intake.queue.put_nowait_enhanced(events(4, generation=1)[0])
    intake.queue.put_nowait_enhanced(events(5, generation=2)[0])
    assert [e.message.offset for e in await asyncio.wait_for(pending, 1)] == [5]


class Consumer:
    """What ``deliver_directly`` needs of Faust's consumer, with Faust's wait_first counted."""

    def __init__(self) -> None:
        self.suspend_flow = ModeEvent()
        self.faust_calls = 0

    async def wait_first(self, *coros: Any, timeout: Any = None) -> str:
        self.faust_calls += 1
        for coro in coros:
            coro.close()
        return "faust"


async def test_deliveries_are_awaited_directly_while_the_flow_is_not_suspended() -> None:
    consumer = Consumer()
    deliver_directly(consumer)
    delivered: list[int] = []

    async def deliver(n: int) -> int:
        delivered.append(n)
        return n

    result = await consumer.wait_first(deliver(1), consumer.suspend_flow.wait())
    assert result.results == [1] and delivered == [1] and consumer.faust_calls == 0
    # anything else is Faust's: another event, a timeout, a suspended flow
    assert await consumer.wait_first(deliver(2), ModeEvent().wait()) == "faust"
    assert await consumer.wait_first(deliver(3), consumer.suspend_flow.wait(), timeout=1) == "faust"
    consumer.suspend_flow.set()
    assert await consumer.wait_first(deliver(4), consumer.suspend_flow.wait()) == "faust"
    assert delivered == [1] and consumer.faust_calls == 3


async def test_faust_consumers_own_suspend_flow_wait_is_recognised() -> None:
    app = faust.App("intake-test", broker="kafka://127.0.0.1:1", autodiscover=False)
    consumer = app.consumer  # created, never started: no broker needed
    faust_calls: list[int] = []
    faust_wait_first = consumer.wait_first

    async def counted(*coros: Any, timeout: Any = None) -> Any:
        faust_calls.append(1)
        return await faust_wait_first(*coros, timeout=timeout)

    consumer.wait_first = counted
    deliver_directly(consumer)

    async def deliver() -> str:
        return "delivered"

    # the call Faust's fetch loop makes for every message
    result = await consumer.wait_first(deliver(), consumer.suspend_flow.wait())
    assert result.results == ["delivered"] and faust_calls == []
