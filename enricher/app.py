"""The Faust layer: builds the app from the config; one loop per topic hands records to a pipeline.

``create_app(config, web_port=...)`` returns an :class:`EnricherApp` (the Faust app plus the
worker's runtime); there is no module-level app. Faust consumes, rebalances and commits;
instead of an agent's stream (whose per-event machinery was a large part of the worker's CPU),
each input topic's events are taken in batches (:mod:`enricher.intake`) by one loop. Events
are acked in offset order, only after their output or dead letter is acknowledged by the broker.

The app also serves ``/metrics`` and ``/health`` on its web port (:mod:`enricher.web`) and
writes the worker's heartbeat to Redis (:mod:`enricher.heartbeat`) once its runtime is up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from faust.types import TP

from .config import Config
from .errors import ShuttingDown
from .heartbeat import Heartbeat
from .intake import LIVE_HOLD, REPLAY_HOLD, Intake, deliver_directly
from .kafka_security import faust_credentials
from .monitor import WorkerMonitor
from .pipeline import OutputTooLarge, Pipeline, SinkUnavailable
from .records import ORIGIN_HEADER, REPLAY_HEADER, InputRecord, OutputRecord, parse_origin
from .runtime import Runtime
from .serving_web import install_serving
from .web import install_views

__all__ = ["EnricherApp", "create_app", "faust_settings"]

log = logging.getLogger(__name__)

# What is acked: Faust's event (its final ack marks the offset committable).
AckToken = Any

REVOKE_WAIT_MAX = 2.0  # seconds in-flight events of revoked partitions get before abandoned


def revoke_wait(config: Config) -> float:
    """How long a rebalance waits for in-flight events of revoked partitions: short, since
    every member of the group waits for this one to rejoin. Writes already begun then get up to
    the pipeline's ``write_wait`` more (cancelling one mid-write would only duplicate it)."""
    return min(REVOKE_WAIT_MAX, config.kafka.rebalance_timeout / 3)


def faust_settings(config: Config, *, web_port: int) -> dict[str, Any]:
    """Faust settings derived from the config (PITFALLS 5, 6, 8, 9)."""
    in_flight = config.worker.in_flight
    return {
        "broker": list(config.kafka.broker),
        "broker_credentials": faust_credentials(config.kafka.security),  # TLS / SASL_SSL
        "broker_session_timeout": config.kafka.session_timeout,
        "broker_rebalance_timeout": config.kafka.rebalance_timeout,
        "broker_heartbeat_interval": min(3.0, config.kafka.session_timeout / 3),
        # Commit often: after a crash, what finished since the last commit is produced again.
        "broker_commit_interval": 0.5,
        "broker_commit_every": in_flight,
        "broker_max_poll_records": max(1, min(in_flight, 500)),
        "stream_buffer_maxsize": max(1, min(in_flight, 256)),
        "stream_wait_empty": False,  # we drain ourselves; waiting on token holds could hang
        "consumer_auto_offset_reset": config.kafka.auto_offset_reset,
        "topic_partitions": config.kafka.partitions,
        "producer_acks": -1,
        # Outputs gather for a few ms into one produce request: one per record would cost a
        # syscall and a broker round trip each.
        "producer_linger": 0.005,
        "web_bind": config.worker.web_host,
        "web_host": config.worker.web_host,
        "web_port": web_port,
        "autodiscover": False,
        "store": "memory://",
    }


class FaustSink:
    """Writes records with the app's producer and waits for the broker's acknowledgement."""

    def __init__(self, app: faust.App) -> None:
        self._app = app

    async def write(self, record: OutputRecord) -> None:
        try:
            await self._app.producer.send_and_wait(
                record.topic, record.key, record.value, None, None, list(record.headers)
            )
        except MessageSizeTooLargeError as exc:
            raise OutputTooLarge(str(exc)) from None
        except ProducerSendError as exc:  # Faust wraps what aiokafka raises before sending
            if isinstance(exc.__cause__, MessageSizeTooLargeError):
                raise OutputTooLarge(str(exc.__cause__)) from None
            raise SinkUnavailable(type(exc.__cause__ or exc).__name__) from None
        except (KafkaError, OSError) as exc:
            raise SinkUnavailable(type(exc).__name__) from None


class FaustPartitions:
    """The consumer's assignment, committed offsets and highwaters, for the monitor."""

    def __init__(self, app: faust.App) -> None:
        self._app = app

    def _consumer(self) -> Any:
        return getattr(self._app, "_consumer", None)  # never create it from here

    def assigned(self) -> list[tuple[str, int]]:
        consumer = self._consumer()
        if consumer is None:
            return []
        return [(tp.topic, tp.partition) for tp in consumer.assignment()]

    def committed(self, tp: tuple[str, int]) -> int | None:
        """What Faust last committed (None: nothing yet, or 0)."""
        offsets = getattr(self._consumer(), "_committed_offset", None)
        value = offsets.get(TP(*tp)) if isinstance(offsets, Mapping) else None
        return int(value) if value is not None else None

    def highwater(self, tp: tuple[str, int]) -> int | None:
        consumer = self._consumer()
        value = consumer.highwater(TP(*tp)) if consumer is not None else None
        return int(value) if value is not None else None


class EnricherApp:
    """A Faust app wired to one worker's runtime."""

    def __init__(self, config: Config, *, web_port: int) -> None:
        self.config = config
        settings = faust_settings(config, web_port=web_port)
        self.faust = faust.App(config.app_id, **settings)
        self.monitor = WorkerMonitor(
            config, web_port=web_port, partitions=FaustPartitions(self.faust)
        )
        install_views(self.faust, self.monitor)
        self.serving = install_serving(self.faust, config, worker=self.monitor.worker)
        self._heartbeat: Heartbeat | None = None
        self._runtime: Runtime[AckToken] | None = None
        self._ready = asyncio.Event()
        self._revoked_generation: int | None = None  # events read in it are stale
        self.input_topic = self._topic(config.topics.input)
        self.replay_topic = self._topic(config.topics.replay)
        self.output_topics = [
            self._topic(config.topics.output),
            self._topic(config.topics.dead_letter),
        ]
        buffer = settings["stream_buffer_maxsize"]
        self._live_intake = Intake(self.faust, self.input_topic, buffer, hold=LIVE_HOLD)
        self._replay_intake = Intake(self.faust, self.replay_topic, buffer, hold=REPLAY_HOLD)
        self.faust.task(self._live_loop)
        self.faust.task(self._replay_loop)
        self.faust.task(self._start_runtime)
        self.faust.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]

    def _topic(self, name: str) -> Any:
        return self.faust.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=self.config.kafka.partitions,
        )

    @property
    def runtime(self) -> Runtime[AckToken] | None:
        """The running worker's parts, once started."""
        return self._runtime

    async def _start_runtime(self) -> None:
        for topic in self.output_topics:
            await topic.maybe_declare()
        self._runtime = Runtime(
            self.config, sink=self.serving.wrap(FaustSink(self.faust)), release=_ack
        )
        self.monitor.attach(self._runtime)
        _before_revocation(self.faust.consumer, self._settle_revoked)
        deliver_directly(self.faust.consumer)
        self._heartbeat = Heartbeat(self.monitor, self._runtime.redis)
        self._heartbeat.start()
        self._ready.set()
        log.info(
            "worker %s ready; metrics and health at %s",
            self.monitor.worker,
            self.monitor.web_url,
            extra={"worker": self.monitor.worker, "web_url": self.monitor.web_url},
        )

    async def _live_loop(self) -> None:
        runtime = await self._started()
        await _feed(self._live_intake, runtime.pipeline, _live_record, self._current)

    async def _replay_loop(self) -> None:
        runtime = await self._started()

        async def replayed(message: Any) -> InputRecord:
            headers = _headers(message)
            replay_id = headers.get(REPLAY_HEADER, "unknown")
            return InputRecord(
                message.topic,
                message.partition,
                message.offset,
                message.key,
                message.value,
                lane=await runtime.replay_lane(replay_id),
                origin=parse_origin(headers.get(ORIGIN_HEADER)),
            )

        await _feed(self._replay_intake, runtime.replay_pipeline, replayed, self._current)

    async def _started(self) -> Runtime[AckToken]:
        await self._ready.wait()
        assert self._runtime is not None
        return self._runtime

    def _current(self, event: Any) -> bool:
        """False for an event read before a revocation began (its partition's next owner,
        maybe this worker again, reads it from the committed offset)."""
        generation = getattr(event.message, "generation_id", None)
        return generation != self._revoked_generation or generation is None

    async def _on_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        if self.faust.consumer_generation_id == self._revoked_generation:
            self._revoked_generation = None  # no new generation (not seen with Kafka): go on

    async def _settle_revoked(self, revoked: Any) -> None:
        """Before Faust drops its uncommitted acks of ``revoked``: stop feeding events read so
        far, give the in-flight ones of those partitions a short wait, abandon the rest, and
        commit what is acked while the partitions are still ours."""
        runtime = self._runtime
        if runtime is None or not revoked:
            return
        self._revoked_generation = self.faust.consumer_generation_id
        tps = [(tp.topic, tp.partition) for tp in revoked]
        wait = revoke_wait(self.config)
        await asyncio.gather(
            runtime.pipeline.revoke(tps, wait), runtime.replay_pipeline.revoke(tps, wait)
        )
        committed = await _commit_acked(self.faust.consumer)
        log.info(
            "partitions revoked: in-flight events finished or abandoned unwritten; %s",
            "acked offsets committed" if committed else "no new acked offset to commit",
        )

    async def shutdown(self, grace: float) -> None:
        """Finish or abandon in-flight events before Faust commits and stops; then remove the
        heartbeat (status stops counting this worker at once) and disconnect."""
        runtime = self._runtime
        if runtime is None:
            return
        in_flight = (
            runtime.pipeline.tracker.in_flight() + runtime.replay_pipeline.tracker.in_flight()
        )
        log.info(
            "worker %s stopping: %d event(s) in flight get %.0fs to finish",
            self.monitor.worker,
            in_flight,
            grace,
            extra={"worker": self.monitor.worker, "in_flight": in_flight},
        )
        await runtime.drain(grace)
        if await _commit_acked(self.faust.consumer):  # before Faust stops and leaves the group
            log.info("worker %s committed its acked offsets", self.monitor.worker)
        if self._heartbeat is not None:
            await self._heartbeat.close()
        await runtime.disconnect()
        await self.serving.close()


async def _feed(
    intake: Intake,
    pipeline: Pipeline[AckToken],
    to_record: Callable[[Any], Awaitable[InputRecord]],
    current: Callable[[Any], bool],
) -> None:
    """The worker loop: hand each event to the pipeline, which acks it (in offset order) once
    its output is written (PITFALLS 1, 2). Events that are no longer ``current`` (read before a
    revocation) are dropped unacked."""
    async for batch in intake.batches():
        for event in batch:
            if not current(event):
                continue
            try:
                record = await to_record(event.message)
                await pipeline.submit(record, event, functools.partial(current, event))
            except ShuttingDown:
                return


def _before_revocation(consumer: Any, settle: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``settle(revoked)`` when partitions are revoked, *before* Faust's consumer drops the
    acks it has not committed yet for them (it does so first thing, then runs the app's
    handlers), so what was written can still be committed."""
    original = consumer.on_partitions_revoked

    async def on_partitions_revoked(revoked: Any) -> None:
        try:
            await settle(revoked)
        except Exception:  # never break the rebalance: at worst some events are done twice
            log.exception("settling revoked partitions failed")
        await original(revoked)

    consumer.on_partitions_revoked = on_partitions_revoked


async def _commit_acked(consumer: Any) -> bool:
    """Commit every acked offset now. Faust's ``commit`` does nothing while another commit
    runs (that one may predate our last acks), so wait for it first."""
    await consumer.maybe_wait_for_commit_to_finish()
    return bool(await consumer.commit())


async def _live_record(message: Any) -> InputRecord:
    return InputRecord(message.topic, message.partition, message.offset, message.key, message.value)


def _headers(message: Any) -> dict[str, str]:
    """A message's headers as text (Faust gives a list of pairs or a mapping)."""
    raw = message.headers or []
    pairs = raw.items() if isinstance(raw, Mapping) else raw
    return {k: v.decode("utf-8", "replace") for k, v in pairs if isinstance(v, bytes)}


async def _ack(event: AckToken) -> None:
    event.ack()


def create_app(config: Config, *, web_port: int) -> EnricherApp:
    """Build the Faust app for ``config``, serving its web views on ``web_port`` (no side
    effects until it is run)."""
    return EnricherApp(config, web_port=web_port)
