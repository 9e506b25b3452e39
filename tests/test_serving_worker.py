"""Serving enriched state with real workers: ``GET /enrichments/{key}`` from two workers, in both
store modes, before and after one of them stops and its partitions move."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from enricher.services import find_free_port

from .harness import Stack

pytestmark = pytest.mark.integration

KEYS = [f"user{i}" for i in range(40)] + ["user 7/ü?&"]  # one key that needs percent-encoding
CLICKS = 8  # passthrough events per key before the enriched one


@dataclass
class Timings:
    """GET latencies (seconds) of one worker, by how the answer was served."""

    local: list[float] = field(default_factory=list)
    forwarded: list[float] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        for name, values in (("local", self.local), ("forwarded", self.forwarded)):
            if values:
                ordered = sorted(values)
                p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
                median = statistics.median(ordered)
                parts.append(
                    f"{name} n={len(values)} median={median * 1e3:.2f}ms p99={p99 * 1e3:.2f}ms"
                )
        return ", ".join(parts)


def click(key: str, seq: int) -> dict[str, Any]:
    return {"type": "click", "user": key, "seq": seq}


def page_view(key: str, seq: int) -> dict[str, Any]:
    return {
        "type": "page_view",
        "user": key,
        "seq": seq,
        "client": {"ip": f"10.2.{seq}.{len(key)}"},
    }


def last_outputs(outputs: list[dict[str, Any]], *, seq: int) -> dict[str, Any]:
    """The output of each key's event ``seq`` (its last one)."""
    latest = {out["user"]: out for out in outputs if out["seq"] == seq}
    assert set(latest) == set(KEYS)
    return latest


async def get_enrichment(
    http: aiohttp.ClientSession, base: str, key: str, timings: Timings, *, timeout: float = 30.0
) -> tuple[int, Any]:
    """GET one key, retrying while the worker answers 503 (a rebalance); (status, JSON body)."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.perf_counter()
        async with http.get(f"{base}/enrichments/{quote(key, safe='')}") as response:
            body = await response.json(content_type=None)
            elapsed = time.perf_counter() - started
            if response.status != 503:
                forwarded = "X-Enricher-Forwarded-By" in response.headers
                (timings.forwarded if forwarded else timings.local).append(elapsed)
                return response.status, body
        assert time.monotonic() < deadline, f"{base} still answers 503 for {key!r}: {body}"
        await asyncio.sleep(0.2)


async def check_every_key(
    http: aiohttp.ClientSession, bases: Sequence[str], latest: dict[str, Any], *, rounds: int = 1
) -> dict[str, Timings]:
    """GET every key ``rounds`` times from each worker: always its latest output."""
    timings = {base: Timings() for base in bases}
    for base in bases:
        for key in KEYS * rounds:
            status, body = await get_enrichment(http, base, key, timings[base])
            assert status == 200, f"{base} {key!r}: {status} {body}"
            assert body == latest[key], f"{base} {key!r}: {body} != {latest[key]}"
        status, body = await get_enrichment(http, base, "nobody", timings[base])
        assert status == 404 and "error" in body
    return timings


@pytest.mark.parametrize("store", ["table", "redis"])
async def test_both_workers_serve_the_latest_enrichment_also_after_one_stops(
    stack: Stack, store: str
) -> None:
    """Worker 0 enriches two rounds alone; worker 1 joins (in table mode it rebuilds its
    partitions from the changelog); a third round goes through both. Every key then answers
    its last output from either worker, and from the survivor once worker 0 has stopped."""
    config = stack.config()
    config["serving"] = {"store": store}
    path = stack.write_config(config)
    ports = [find_free_port(), find_free_port()]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    first = stack.start_worker(path, ["--web-port", str(ports[0])])
    # many passthrough events first: long changelog partitions, written in multi-record batches
    await stack.produce([(key, click(key, seq)) for seq in range(CLICKS) for key in KEYS])
    got = await stack.collect(expected=CLICKS * len(KEYS))
    stack.start_worker(path, ["--web-port", str(ports[1])])
    await stack.wait_for_members(2)
    async with aiohttp.ClientSession() as http:
        await check_every_key(http, bases, last_outputs(got.outputs, seq=CLICKS - 1))  # rebuilt
        await stack.produce([(key, page_view(key, CLICKS)) for key in KEYS])
        got = await stack.collect(expected=(CLICKS + 1) * len(KEYS))
        latest = last_outputs(got.outputs, seq=CLICKS)
        before = await check_every_key(http, bases, latest, rounds=3)
        first.stop()
        await stack.wait_for_members(1)
        after = await check_every_key(http, bases[1:], latest, rounds=3)
    for label, timings in (("two workers", before), ("after one stopped", after)):
        for base, timing in timings.items():
            print(f"serving {store} {label} {base}: {timing.summary()}")
    if store == "table":  # each worker owns some partitions: the others' keys are forwarded
        assert all(t.forwarded and t.local for t in before.values())
        assert not after[bases[1]].forwarded
    else:
        assert not any(t.forwarded for t in (*before.values(), *after.values()))


async def replay_state(stack: Stack, config: Any, replay_id: str) -> str:
    out = await stack.enricher("replay", "status", replay_id, "--config", str(config), "--json")
    return str(json.loads(out)["state"])


@pytest.mark.parametrize("store", ["table", "redis"])
async def test_a_replay_of_older_events_leaves_the_latest_enrichment_served(
    stack: Stack, store: str
) -> None:
    config = stack.config()
    config["serving"] = {"store": store}
    path = stack.write_config(config)
    port = find_free_port()
    base = f"http://127.0.0.1:{port}"
    stack.start_worker(path, ["--web-port", str(port)])
    await stack.produce([(key, click(key, seq)) for seq in range(2) for key in KEYS])
    await stack.collect(expected=2 * len(KEYS))
    older_than = datetime.now(UTC).isoformat()
    await asyncio.sleep(0.1)  # the latest events get a later broker timestamp
    await stack.produce([(key, page_view(key, 2)) for key in KEYS])
    latest = last_outputs((await stack.collect(expected=3 * len(KEYS))).outputs, seq=2)
    out = await stack.enricher(
        "replay", "--config", str(path), "--from", "-1h", "--to", older_than, "--yes", "--detach"
    )
    replay_id = out.strip().splitlines()[-1].strip()
    await stack.collect_replayed(replay_id, 2 * len(KEYS))
    # A replayed event is counted only after its output and its store write: once the replay is
    # done, every replayed output has reached the store (or been refused by the offset rule).
    async with asyncio.timeout(30):
        while await replay_state(stack, path, replay_id) != "done":  # noqa: ASYNC110 - Redis
            await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as http:
        await check_every_key(http, [base], latest)  # not the replayed seq 1
