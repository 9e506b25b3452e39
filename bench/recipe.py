"""The hand-written recipe: the worker users write themselves from the same packages.

A Faust app with one agent on the input topic; per event, ``async with AsyncLimiter(rate, 1)``
(aiolimiter: a leaky bucket of ``rate`` calls per second, per process), an aiohttp GET wrapped
in a tenacity retry (5 attempts, full-jitter exponential backoff on client errors and timeouts,
``raise_for_status`` so 429 and 5xx retry), then ``await output_topic.send(...)``. Errors are
caught per event (an exception escaping the agent would end it). The agent's concurrency is
Faust's default, 1, unless ``BENCH_CONCURRENCY`` says otherwise.

Written as a user writes it: a module-level app and agent. Run by the bench as
``env BENCH_...=... python -m bench.recipe worker -l warn`` (settings in ``faustapp.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from .faustapp import AppEnv, create_app

logger = logging.getLogger(__name__)

env = AppEnv.read()
app = create_app(env)
events = app.topic(env.input, key_serializer="raw", value_serializer="json")
enriched = app.topic(env.output, key_serializer="raw", value_serializer="json")
limiter = AsyncLimiter(env.rate, 1)
timeout = aiohttp.ClientTimeout(total=2)


@retry(
    stop=stop_after_attempt(5),
    wait=wait_random_exponential(multiplier=0.1, max=10),
    retry=retry_if_exception_type((aiohttp.ClientError, asyncio.TimeoutError)),
    reraise=True,
)
async def lookup(session: aiohttp.ClientSession, ip: str) -> Any:
    async with session.get(env.api_url.format(ip=ip), timeout=timeout) as response:
        response.raise_for_status()
        return await response.json()


@app.agent(events, concurrency=env.concurrency)  # type: ignore[untyped-decorator]
async def enrich(stream: Any) -> None:
    async with aiohttp.ClientSession() as session:
        async for key, event in stream.items():
            try:
                async with limiter:
                    geo = await lookup(session, event["client"]["ip"])
                event["enrichment"] = {"geo": geo}
                await enriched.send(key=key, value=event)
            except Exception:
                logger.exception("event %r not enriched", key)


if __name__ == "__main__":
    app.main()
