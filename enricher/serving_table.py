"""Served states in a Faust table (``serving.store: table``), partitioned like the input topic.

The table ``serving.table`` maps the Kafka key bytes of an input record to
:meth:`Served.encode() <enricher.serving.Served.encode>` (the output value behind its input's
coordinates). Its changelog topic ``<app_id>-<table>-changelog`` has the input's partitions,
and a key's entry goes to the partition its input came from, so the worker that owns an input
partition owns the same table partition (Faust assigns co-partitioned topics together) and a
rebalance moves both at once; the new owner rebuilds it from the changelog.

Why not ``table[key] = value``: Faust picks the changelog partition from the event being
processed (``current_event()``), and the pipeline writes outputs from its own tasks, outside
Faust's per-event context. :meth:`TableEnrichments.put` sends the changelog record to the
input's partition explicitly (what ``Table.on_key_set`` does with the event's partition), sets
the local entry, and waits for the broker's acknowledgement, so an input offset is committed
only after the changelog holds its state.

Why :class:`ChangelogTail`: after a rebalance Faust rebuilds each owned partition by reading its
changelog up to the end offset the broker reports (the in-memory store has no checkpoint, so
from the start, over what the worker already held). A Tansu broker reports less than it holds
(the base offset of a partition's last batch, it seems: 872 for 880 records), so the last
records of a partition are not read and their keys fall back to an older enrichment. The tail
reader reads on from there to whatever the broker returns, applying :func:`replaces`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.types import TP

from .errors import ServiceUnavailable
from .serving import Served, replaces

__all__ = ["ChangelogTail", "TableEnrichments", "create_table"]

log = logging.getLogger(__name__)

_FAILURES: Final = (KafkaError, OSError, TimeoutError)


def create_table(app: Any, name: str, *, partitions: int) -> Any:
    """Register the serving table on a Faust app (before it starts): raw key and value bytes."""
    return app.Table(
        name,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        help="latest enrichment per input key (enricher serving)",
    )


class TableEnrichments:
    """The :class:`~enricher.serving.EnrichmentStore` in a Faust table.

    ``owns(topic, partition)`` says whether this worker holds that input partition now: an
    output finished after its partition moved to another worker is not written (the new owner
    enriches that event again and stores it), which keeps an old result from landing in the
    changelog after a newer one. ``get`` reads this worker's copy only; routing a key to its
    owner is :mod:`enricher.serving_web`'s job.
    """

    def __init__(self, table: Any, *, owns: Callable[[str, int], bool]) -> None:
        self._table = table
        self._owns = owns
        self.not_owned = 0  # outputs not stored: their partition had moved

    async def put(self, key: bytes, served: Served) -> None:
        if not self._owns(served.topic, served.partition):
            self.not_owned += 1
            return
        if not replaces(served, await self.get(key)):
            return
        encoded = served.encode()
        sent = self._table.send_changelog(served.partition, key, encoded)
        self._table.data[key] = encoded
        try:
            await sent
        except _FAILURES as exc:
            raise ServiceUnavailable("kafka", f"changelog write: {type(exc).__name__}") from exc

    async def get(self, key: bytes) -> Served | None:
        raw = self._table.data.get(key)
        return Served.decode(raw) if isinstance(raw, bytes) else None

    def apply(self, key: bytes | None, raw: bytes | None) -> bool:
        """Apply one changelog record to the local copy if newer; True when that changed it."""
        served = Served.decode(raw) if key is not None and raw else None
        if served is None or key is None:
            return False
        current = self._table.data.get(key)
        if current == raw:
            return False
        if not replaces(served, Served.decode(current) if isinstance(current, bytes) else None):
            return False
        self._table.data[key] = raw
        return True

    async def close(self) -> None:
        return None


class ChangelogTail:
    """Reads the owned changelog partitions past the end offsets Faust's recovery stopped at.

    Register with ``table.on_recover(tail)``: each completed recovery starts one background
    read (the stream is not held up); :attr:`ready` is False until it is done, and GETs answer
    503 meanwhile. A read stops once the broker has returned nothing for ``idle`` seconds
    (``first_wait`` for the first poll); it never runs longer than ``limit``.
    """

    def __init__(
        self,
        app: Any,
        table: Any,
        store: TableEnrichments,
        *,
        input_topic: str,
        client_options: Mapping[str, Any],
        first_wait: float = 1.5,
        idle: float = 0.3,
        limit: float = 30.0,
    ) -> None:
        self._app = app
        self._table = table
        self._store = store
        self._input_topic = input_topic
        self._client_options = dict(client_options)  # servers and security (kafka_options)
        self._waits = (first_wait, idle)
        self._limit = limit
        self._task: asyncio.Task[None] | None = None
        self.applied = 0  # records found past the reported ends, in all reads

    @property
    def ready(self) -> bool:
        return self._task is None or self._task.done()

    async def wait(self) -> None:
        """Until the current read, if any, is done."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def __call__(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        self._check_partitions()
        try:
            async with asyncio.timeout(self._limit):
                await self._read(self._starts())
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("serving table: reading the changelog tail failed: %r", exc)

    def _check_partitions(self) -> None:
        """Entries go to their input's partition number: the counts must match (as Faust
        itself checks for tables written from a stream)."""
        found = self._app.consumer.topic_partitions(self._input_topic)
        if found is not None and found != self._table.partitions:
            log.error(
                "serving table: input topic %s has %d partitions, the table %d: requests are "
                "routed to the wrong worker; set kafka.partitions to %d",
                self._input_topic,
                found,
                self._table.partitions,
                found,
            )

    def _starts(self) -> dict[TopicPartition, int]:
        """Owned changelog partitions and the offset Faust read up to (0 when unknown)."""
        topic = self._table.changelog_topic.get_topic_name()
        reported = getattr(getattr(self._app.tables, "recovery", None), "active_highwaters", {})
        assigned = self._app.consumer.assignment()
        owned = sorted({tp.partition for tp in assigned if tp.topic == self._input_topic})
        return {
            TopicPartition(topic, partition): int(reported.get(TP(topic, partition)) or 0)
            for partition in owned
        }

    async def _read(self, starts: dict[TopicPartition, int]) -> None:
        if not starts:
            return
        consumer = AIOKafkaConsumer(**self._client_options, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign(list(starts))
            for tp, offset in starts.items():
                consumer.seek(tp, offset)
            applied, wait = 0, self._waits[0]
            while batch := await consumer.getmany(timeout_ms=int(wait * 1000)):
                wait = self._waits[1]
                for records in batch.values():
                    applied += sum(self._store.apply(r.key, r.value) for r in records)
        finally:
            await consumer.stop()
        self.applied += applied
        if applied:
            log.info("serving table: %d changelog record(s) past the reported end applied", applied)
