"""Scenario: canary secrets in API headers and the Redis password must not leak anywhere."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import quote

import aiohttp

from enricher.services import EmbeddedRedis, find_free_port, run_enricher

from .faults import fault_apis, fault_rules, poison_records
from .scenario import Result, api, finish, geo_rule, page_view
from .stack import ChaosStack, Scene, say

__all__ = ["secrets"]

KINDS = ["5xx", "timeout", "reset", "nonjson", "429"]


async def secrets(stack: ChaosStack, scale: float) -> Result:
    """A worker with a canary API key (in two headers) and a canary Redis password, through
    failing calls, hostile input and a Redis outage: no canary in its logs, outputs, dead
    letters, /metrics, /health, /dashboard.json, ``status --json`` or ``check-config``."""
    result, per_kind = Result("secrets"), max(2, int(5 * scale))
    key, password = f"canaryKEY{uuid.uuid4().hex}", f"canaryPW{uuid.uuid4().hex}"
    redis = EmbeddedRedis(password=password)
    await redis.astart()
    scene = Scene(stack, "secrets", redis_url=redis.url)
    scene.keep_raw = True
    scene.env = {"CHAOS_API_KEY": key}
    headers = {"X-Api-Key": "${CHAOS_API_KEY}", "Authorization": "Bearer ${CHAOS_API_KEY}"}
    apis = {name: {**a, "headers": headers} for name, a in fault_apis(KINDS).items()}
    apis["geo"] = api("/geo/{ip}", 50.0, 10, headers=headers)
    scene.config(apis, [*fault_rules(KINDS), geo_rule()])
    await scene.start()
    port = find_free_port()
    scene.start_worker("--web-port", str(port), "--log-format", "json")
    try:
        stack.api_update(hang=3.0)
        events = [page_view(i) for i in range(10)] + poison_records()[:12]
        events += [
            page_view(100 * n + i, f"fault-{k}")
            for n, k in enumerate(KINDS, 1)
            for i in range(per_kind)
        ]
        await scene.produce(events)
        await scene.wait_for("first output", lambda: bool(scene.seen), 60)
        say("  Redis (with password) down for 3 s")
        await redis.astop()
        await asyncio.sleep(3)
        await redis.astart()
        await scene.drain(90)
        finish(result, scene, {}, allow_dead_letters=True)
        texts = {"outputs and dead letters": b"\n".join(scene.raw).decode(errors="replace")}
        texts |= await _web_pages(port)
        texts |= await _commands(scene)
        texts |= {w.log_path.name: w.log_text() for w in scene.workers}
        canaries = {key, password, quote(key, safe=""), quote(password, safe="")}
        leaks = sorted({where for where, text in texts.items() for c in canaries if c in text})
        result.check(
            "no canary anywhere",
            not leaks,
            f"searched {len(texts)} places, {sum(map(len, texts.values())):,} chars;"
            f" leaks in: {leaks or 'none'}",
        )
        result.figures["searched"] = sorted(texts)
    finally:
        stack.api_update(hang=30.0)
        await scene.close()
        await asyncio.to_thread(redis.close)
    return result


async def _web_pages(port: int) -> dict[str, str]:
    pages = {}
    async with aiohttp.ClientSession() as http:
        for page in ("/metrics", "/health", "/dashboard.json", "/dashboard"):
            async with http.get(f"http://127.0.0.1:{port}{page}") as response:
                if page != "/health":  # /health may answer 503 while Redis is down
                    response.raise_for_status()  # an error page proves nothing about leaks
                pages[page] = await response.text()
    return pages


async def _commands(scene: Scene) -> dict[str, str]:
    found = {}
    config = str(scene.config_path)
    for args in (
        ["status", "--config", config, "--json"],
        ["check-config", config],
        ["limits", "show", "--config", config, "--json"],
    ):
        code, out, err = await run_enricher(*args)
        if code != 0:  # a command that failed proves nothing about leaks
            raise RuntimeError(f"enricher {args[0]}: exit {code}: {err[-500:]}")
        found[f"enricher {args[0]}"] = out + err
    return found
