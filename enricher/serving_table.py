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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from aiokafka.errors import KafkaError

from .errors import ServiceUnavailable
from .serving import Served, replaces

__all__ = ["TableEnrichments", "create_table"]

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

    async def close(self) -> None:
        return None
