"""The batched intake in place of a Faust stream: queue semantics and what it skips, as Faust's
stream does (the real conductor path runs in every worker test)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from enricher.intake import Intake, IntakeQueue


@dataclass
class Message:
    offset: int
    generation_id: int = 1


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
class App:
    flow_control: FlowControl = field(default_factory=FlowControl)
    consumer_generation_id: int = 1
    topics: Topics = field(default_factory=Topics)


class Topic:
    def clone_using_queue(self, queue: IntakeQueue) -> tuple[str, IntakeQueue]:
        return ("channel", queue)


def events(*offsets: int, generation: int = 1) -> list[Event]:
    return [Event(Message(offset, generation)) for offset in offsets]


async def test_take_returns_everything_queued_in_order_and_waits_when_empty() -> None:
    queue = IntakeQueue(10)
    for value in (1, 2, 3):
        queue.put_nowait_enhanced(value, on_pressure_high=None, on_pressure_drop=None)
    assert await queue.take() == [1, 2, 3]
    assert queue.empty()
    waiting = asyncio.ensure_future(queue.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put_nowait(4)
    assert await asyncio.wait_for(waiting, 1) == [4]


async def test_put_holds_while_full_until_a_batch_is_taken() -> None:
    queue = IntakeQueue(2)
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert queue.full()
    held = asyncio.ensure_future(queue.put(3))
    await asyncio.sleep(0)
    assert not held.done() and len(queue) == 2
    assert await queue.take() == [1, 2]
    await asyncio.wait_for(held, 1)
    assert await queue.take() == [3]


def test_a_queue_needs_room_for_one() -> None:
    with pytest.raises(ValueError, match="maxsize must be >= 1, got 0"):
        IntakeQueue(0)


async def test_intake_subscribes_its_channel_and_skips_what_a_faust_stream_skips() -> None:
    app = App()
    intake = Intake(app, Topic(), maxsize=10)
    assert app.topics.added == [("channel", intake.queue)]
    batches = intake.batches()
    intake.queue.put_nowait_enhanced(events(0, generation=0)[0])  # read before a rebalance
    for event in events(1, 2):
        intake.queue.put_nowait_enhanced(event)
    assert [e.message.offset for e in await anext(batches)] == [1, 2]
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
