"""Running one worker process: preflight checks, then the Faust worker until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import faust
from aiokafka import AIOKafkaClient

from .app import EnricherApp, create_app
from .config import Config
from .errors import ServiceUnavailable
from .kafka import kafka_options
from .logs import LogFormat, use_format
from .runtime import connect_redis
from .services import find_free_port

__all__ = ["SHUTDOWN_GRACE", "EnricherWorker", "preflight", "run_worker", "tune_gc"]

SHUTDOWN_GRACE = 5.0  # seconds running calls get to finish on SIGTERM before being abandoned

# Allocations (less deallocations) between two young-generation collections. Python's 700
# made a busy worker collect about twice per 100 events, and about every hundredth of those
# collections walked every object of Faust, aiohttp and pydantic (all of it: 5-10% of the
# CPU per event in an in-process A/B).
GC_YOUNG_THRESHOLD = 10_000


class EnricherWorker(faust.Worker):
    """A Faust worker that drains the pipeline and commits what it acked before Faust stops the
    consumer and leaves the group.

    With ``log_format="json"`` every log record (ours and Faust's) is one JSON line, and Faust's
    banner and spinner are off, so standard output holds nothing but JSON lines."""

    def __init__(
        self, enricher_app: EnricherApp, *, log_format: LogFormat = "text", **kwargs: Any
    ) -> None:
        self.enricher_app = enricher_app
        self.log_format = log_format
        if log_format == "json":
            kwargs["quiet"] = True
        super().__init__(enricher_app.faust, **kwargs)
        if log_format == "json":
            self.spinner = None

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        use_format(self.log_format, logger)
        if self.log_format == "json":
            logging.captureWarnings(True)

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        tune_gc()

    async def on_stop(self) -> None:
        await self.enricher_app.shutdown(SHUTDOWN_GRACE)
        await super().on_stop()


def tune_gc() -> None:
    """Once started: what exists now (modules, the app, the runtime) lives as long as the
    process, so collections stop walking it (``gc.freeze``), and young collections run less
    often. Cyclic garbage is still collected; only later, and in bigger batches."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def preflight(config: Config, *, timeout: float = 15.0) -> None:
    """Fail fast with ServiceUnavailable when Redis or the broker cannot be reached."""
    redis = connect_redis(config)
    try:
        await asyncio.wait_for(_until_ok(redis.ping), timeout)
    except TimeoutError:
        raise ServiceUnavailable("redis", "no answer to PING") from None
    finally:
        await redis.aclose()
    client = AIOKafkaClient(**kafka_options(config))
    try:
        await asyncio.wait_for(_until_ok(client.bootstrap), timeout)
    except TimeoutError:
        raise ServiceUnavailable(
            "kafka", f"no broker answers at {config.kafka.broker[0]}"
        ) from None
    finally:
        await client.close()


async def _until_ok(probe: Any) -> None:
    while True:
        try:
            await probe()
            return
        except Exception:
            await asyncio.sleep(0.5)


def run_worker(
    config: Config,
    *,
    web_port: int | None = None,
    loglevel: str = "info",
    log_format: LogFormat = "text",
) -> None:
    """Run one worker in the foreground until SIGINT/SIGTERM (blocks; exits the process).
    ``log_format`` ``json``: one JSON object per log line (see :mod:`enricher.logs`)."""
    asyncio.run(preflight(config))
    port = web_port or config.worker.web_port or find_free_port(config.worker.web_host)
    app = create_app(config, web_port=port)
    worker = EnricherWorker(app, log_format=log_format, loglevel=loglevel, redirect_stdouts=False)
    worker.execute_from_commandline()
