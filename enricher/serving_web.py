"""``GET /enrichments/{key}`` on the worker's web port, and the serving parts of the Faust app.

The key is the Kafka key of the input records, as UTF-8, percent-encoded in the path
(``/enrichments/user%2F42`` for the key ``user/42``). Answers:

200  the output record value of the key's latest input (JSON), with the headers
     ``X-Enricher-Source`` (``topic/partition/offset`` of that input) and
     ``X-Enricher-Served-By`` (the worker that read it)
404  ``{"error": ...}``: no enrichment stored for this key
503  ``{"error": ...}`` + ``Retry-After``: the store cannot answer now (Redis unreachable; in
     table mode a rebalance: no owner known yet, the owner is rebuilding its table or did not
     answer)

``serving.store: redis``: every worker reads Redis. ``table``: the worker that owns the key's
partition (Faust's table routing: ``app.router.key_store``, from the canonical URL each worker
published when it joined) reads its own table; any other worker forwards the request to it once
(marked ``X-Enricher-Forwarded-By``; a forwarded request is never forwarded again, so two
workers with different views of a rebalance answer 503 instead of bouncing it).
"""

from __future__ import annotations

from typing import Any, Final

import aiohttp
from faust.types import TP
from yarl import URL

from .config import Config
from .errors import ServiceUnavailable
from .kafka import kafka_options
from .pipeline import Sink
from .runtime import connect_redis
from .serving import EnrichmentStore, Served, ServingSink
from .serving_redis import RedisEnrichments
from .serving_table import ChangelogTail, TableEnrichments, create_table

__all__ = ["FORWARDED_HEADER", "Serving", "install_serving"]

FORWARDED_HEADER: Final = "X-Enricher-Forwarded-By"
SERVED_BY_HEADER: Final = "X-Enricher-Served-By"
SOURCE_HEADER: Final = "X-Enricher-Source"
FORWARD_TIMEOUT: Final = 2.0  # seconds for the owner's answer
RETRY_AFTER: Final = {"Retry-After": "1"}


class Serving:
    """One worker's serving parts: the store, and the sink wrapper that feeds it."""

    def __init__(self, config: Config, store: EnrichmentStore | None) -> None:
        self.store = store
        self._output_topic = config.topics.output

    def wrap(self, sink: Sink) -> Sink:
        """``sink`` itself when serving is off; else a sink that also stores outputs."""
        if self.store is None:
            return sink
        return ServingSink(sink, self.store, output_topic=self._output_topic)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


class TableRouter:
    """Which worker owns a key's table partition, from Faust's assignment."""

    def __init__(self, app: Any, table: Any, tail: ChangelogTail) -> None:
        self._app = app
        self._table = table
        self._tail = tail

    def owner(self, key: bytes) -> URL | None:
        """The owner's canonical URL; None while no owner is known (rebalancing)."""
        try:
            return URL(self._app.router.key_store(self._table.name, key))
        except (KeyError, AttributeError):
            return None

    def is_self(self, url: URL) -> bool:
        own = URL(str(self._app.conf.canonical_url))
        return (url.host, url.port) == (own.host, own.port)

    def ready(self) -> bool:
        """False while this worker rebalances or rebuilds its table from the changelog."""
        return not (self._app.rebalancing or self._app.in_recovery) and self._tail.ready


def install_serving(app: Any, config: Config, *, worker: str) -> Serving:
    """Set up ``serving.store`` on a Faust app before it starts: the table or Redis store, the
    canonical URL, and ``GET /enrichments/{key}``. Returns the :class:`Serving` whose
    :meth:`~Serving.wrap` the app applies to its sink."""
    settings = config.serving
    if settings.store == "off":
        return Serving(config, None)
    router: TableRouter | None = None
    store: EnrichmentStore
    if settings.store == "redis":
        store = RedisEnrichments(
            connect_redis(config), app_id=config.app_id, ttl=settings.redis_ttl
        )
    else:
        store, router = _table_mode(app, config)
    _install_view(app, store, router, worker=worker)
    return Serving(config, store)


def _table_mode(app: Any, config: Config) -> tuple[TableEnrichments, TableRouter]:
    """The table, its store, the changelog tail reader after each recovery, and the router."""
    table = create_table(app, config.serving.table, partitions=config.kafka.partitions)

    def owns(topic: str, partition: int) -> bool:
        return TP(topic, partition) in app.consumer.assignment()

    store = TableEnrichments(table, owns=owns)
    tail = ChangelogTail(
        app, table, store, input_topic=config.topics.input, client_options=kafka_options(config)
    )
    table.on_recover(tail)
    if config.serving.advertised_host is not None:
        app.conf.canonical_url = URL.build(
            scheme="http", host=config.serving.advertised_host, port=app.conf.web_port
        )
    return store, TableRouter(app, table, tail)


def _install_view(
    app: Any, store: EnrichmentStore, router: TableRouter | None, *, worker: str
) -> None:
    async def enrichment(view: Any, request: Any, key: str) -> Any:
        raw = key.encode("utf-8")
        if router is not None:
            owner = router.owner(raw)
            if owner is None:
                return _unavailable(view, "no worker owns this key's partition yet (rebalancing)")
            if not router.is_self(owner):
                if request.headers.get(FORWARDED_HEADER):
                    return _unavailable(view, "not the owner of this key's partition (rebalancing)")
                return await _forward(view, request, owner, worker=worker)
            if not router.ready():
                return _unavailable(view, "rebuilding the table after a rebalance")
        try:
            served = await store.get(raw)
        except ServiceUnavailable as exc:
            return _unavailable(view, str(exc))
        if served is None:
            return view.json({"error": f"no enrichment for key {key!r}"}, status=404)
        return _found(view, served, worker=worker)

    app.page("/enrichments/{key}", name="enricher-enrichments")(enrichment)


def _found(view: Any, served: Served, *, worker: str) -> Any:
    headers = {SOURCE_HEADER: served.source, SERVED_BY_HEADER: worker}
    return view.bytes(served.value, content_type="application/json", headers=headers)


def _unavailable(view: Any, message: str) -> Any:
    return view.json({"error": message}, status=503, headers=dict(RETRY_AFTER))


async def _forward(view: Any, request: Any, owner: URL, *, worker: str) -> Any:
    """The owner's answer to the same request (status, body and our headers passed on)."""
    url = request.url.with_scheme(owner.scheme or "http").with_host(owner.host)
    url = url.with_port(owner.port)
    timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
    try:
        async with view.app.http_client.get(
            url, headers={FORWARDED_HEADER: worker}, timeout=timeout
        ) as response:
            body = await response.read()
            passed = {
                h: response.headers[h]
                for h in (SOURCE_HEADER, SERVED_BY_HEADER, "Retry-After")
                if h in response.headers
            }
            return view.bytes(
                body,
                content_type=response.content_type,
                status=response.status,
                headers={**passed, FORWARDED_HEADER: worker},
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _unavailable(
            view, f"the key's owner at {owner} did not answer ({type(exc).__name__})"
        )
