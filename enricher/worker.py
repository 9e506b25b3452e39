"""Running one worker process: preflight checks, then the Faust worker until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from aiokafka import AIOKafkaClient

from .app import EnricherApp, create_app
from .config import Config
from .errors import ServiceUnavailable
from .kafka import kafka_bootstrap
from .runtime import connect_redis
from .services import find_free_port

__all__ = ["SHUTDOWN_GRACE", "EnricherWorker", "preflight", "run_worker"]

SHUTDOWN_GRACE = 5.0  # seconds running calls get to finish on SIGTERM before being abandoned


class EnricherWorker(faust.Worker):
    """A Faust worker that drains the pipeline before Faust stops the consumer and commits."""

    def __init__(self, enricher_app: EnricherApp, **kwargs: Any) -> None:
        self.enricher_app = enricher_app
        super().__init__(enricher_app.faust, **kwargs)

    async def on_stop(self) -> None:
        await self.enricher_app.shutdown(SHUTDOWN_GRACE)
        await super().on_stop()


async def preflight(config: Config, *, timeout: float = 15.0) -> None:
    """Fail fast with ServiceUnavailable when Redis or the broker cannot be reached."""
    redis = connect_redis(config)
    try:
        await asyncio.wait_for(_until_ok(redis.ping), timeout)
    except TimeoutError:
        raise ServiceUnavailable("redis", "no answer to PING") from None
    finally:
        await redis.aclose()
    client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap(config.kafka.broker))
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


def run_worker(config: Config, *, web_port: int | None = None, loglevel: str = "info") -> None:
    """Run one worker in the foreground until SIGINT/SIGTERM (blocks; exits the process)."""
    asyncio.run(preflight(config))
    port = web_port or config.worker.web_port or find_free_port(config.worker.web_host)
    app = create_app(config, web_port=port)
    worker = EnricherWorker(app, loglevel=loglevel, redirect_stdouts=False)
    worker.execute_from_commandline()
