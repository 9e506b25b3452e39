"""Scenarios where the API misbehaves or the input is hostile."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from typing import Any

from .scenario import Result, api, finish, geo_rule, page_view, retry_limits
from .stack import ChaosStack, Scene

__all__ = ["FAULT_KINDS", "api_faults", "poison"]

# sandbox fault -> the dead-letter kind its events must end as
FAULT_KINDS = {
    "5xx": "http_status",
    "429": "http_status",
    "429-absurd": "http_status",
    "timeout": "timeout",
    "reset": "connection",
    "nonjson": "bad_response",
    "huge": "bad_response",
    "drip": "timeout",
}
FAULT_RATE, FAULT_BURST, ATTEMPTS = 20.0, 5, 3
RSS_LIMIT_MB = 400.0
ABSURD_GAP = 4.0  # seconds: a block of max_retry_after (2 s) plus backoff, not 999999999 s


def fault_apis(kinds: list[str], **extra: Any) -> dict[str, dict[str, Any]]:
    """One API per fault kind (``f_5xx``...), on ``/fault/KIND/{ip}``, circuit off (so every
    event gets its attempts and ends as a dead letter), plus the retry deadline and budget when
    the config has them."""
    limits = retry_limits("10s", 0.2)
    apis = {}
    for kind in kinds:
        settings = api(f"/fault/{kind}/{{ip}}", FAULT_RATE, FAULT_BURST, **extra)
        settings["retry"] = {**settings["retry"], "attempts": ATTEMPTS, **limits}
        settings["circuit"] = {"failures": 0}
        apis[f"f_{kind.replace('-', '_')}"] = settings
    return apis


def fault_rules(kinds: list[str]) -> list[dict[str, Any]]:
    name = "f_{}".format
    return [geo_rule(name(k.replace("-", "_")), kind=f"fault-{k}") for k in kinds]


async def api_faults(stack: ChaosStack, scale: float) -> Result:
    """Every API fault at once, one API each, plus a healthy one: each fault's events end as its
    dead-letter kind, within their attempts; nothing lost; the worker's memory stays bounded."""
    result, per_kind = Result("api-faults"), max(3, int(20 * scale))
    kinds = list(FAULT_KINDS)
    scene = Scene(stack, "api-faults")
    scene.keep_raw = True
    apis = fault_apis(kinds) | {"geo": api("/geo/{ip}", 50.0, 10)}
    scene.config(apis, [*fault_rules(kinds), geo_rule()])
    await scene.start()
    worker = scene.start_worker()
    try:
        stack.api_update(hang=5.0, drip_interval=0.5)
        events = [page_view(i) for i in range(per_kind)]
        events += [
            page_view(1000 * n + i, f"fault-{k}")
            for n, k in enumerate(kinds, 1)
            for i in range(per_kind)
        ]
        await scene.produce(events)
        await scene.drain(120)
        limits = {f"/fault/{k}/": (FAULT_RATE, FAULT_BURST) for k in kinds}
        acc = finish(result, scene, limits | {"/geo/": (50.0, 10)}, allow_dead_letters=True)
        _check_kinds(result, scene, kinds)
        logged = stack.api_calls(scene.started)
        fault_calls = [c["path"] for c in logged if c["path"].startswith("/fault/")]
        absurd_times = [c["time"] for c in logged if c["path"].startswith("/fault/429-absurd/")]
        calls = Counter(path.split("/")[2] for path in fault_calls)
        per_event = max(Counter(fault_calls).values(), default=0)  # one path per event
        result.check(
            f"attempts <= {ATTEMPTS} per event",
            per_event <= ATTEMPTS,
            f"most calls for one event: {per_event}",
        )
        ordered = sorted(absurd_times)
        gap = max((b - a for a, b in itertools.pairwise(ordered)), default=0.0)
        result.check(
            "absurd Retry-After capped",
            bool(ordered) and gap <= ABSURD_GAP,
            f"longest pause between 429-absurd calls {gap:.1f} s (cap 2 s)",
        )
        result.check(
            f"worker RSS <= {RSS_LIMIT_MB:g} MB",
            worker.peak_rss_mb <= RSS_LIMIT_MB,
            f"peak {worker.peak_rss_mb:.0f} MB",
        )
        result.figures |= {"calls_per_fault": dict(calls), "peak_rss_mb": round(worker.peak_rss_mb)}
        result.figures["outputs"] = acc.outputs
    finally:
        stack.api_update(hang=30.0)
        await scene.close()
    return result


def _check_kinds(result: Result, scene: Scene, kinds: list[str]) -> None:
    """Each fault's events must be dead letters of the kind FAULT_KINDS names."""
    wrong: Counter[str] = Counter()
    by_kind = _outcomes_by_event_type(scene)
    for kind in kinds:
        outcomes = by_kind.get(f"fault-{kind}", Counter())
        bad = sum(n for outcome, n in outcomes.items() if outcome != FAULT_KINDS[kind])
        if bad:
            wrong[kind] = bad
    result.figures["outcomes_by_type"] = {k: dict(v) for k, v in by_kind.items()}
    result.check(
        "right dead-letter kinds",
        not +wrong,
        "all as expected" if not +wrong else f"wrong: {dict(+wrong)}",
    )


def _outcomes_by_event_type(scene: Scene) -> dict[str, Counter[str]]:
    """Outcome counts per event ``type`` (the tail keeps the raw records of this scenario)."""
    found: dict[str, Counter[str]] = {}
    for raw in scene.raw:
        body = json.loads(raw)
        if "error" in body and "source" in body:
            event, outcome = body.get("event"), body["error"]["kind"]
        else:
            event, outcome = body, "output"
        kind = event.get("type", "?") if isinstance(event, dict) else "?"
        found.setdefault(str(kind), Counter())[outcome] += 1
    return found


def poison_records() -> list[tuple[bytes | None, bytes]]:
    """Hostile input: bad bytes, wrong types, deep nesting, oversize, URL-changing params."""

    def view(ip: Any, lang: Any = "en") -> bytes:
        return json.dumps({"type": "page_view", "client": {"ip": ip, "lang": lang}}).encode()

    deep = "[" * 10_000 + "]" * 10_000
    hostile = [
        "../../admin",
        "..",
        ".",
        "a/../../b",
        "x?admin=1",
        "x#frag",
        "user@evil.example",
        "http://evil.example/x",
        "//evil.example",
        "a\r\nHost: evil.example",
        "%2e%2e",
        "a b",
        "\u00e9\u4e2d",
        "a;b=c",
        "x&y=z",
    ]
    records = [
        b"{not json",
        b"\xff\xfe\xfa",
        b"[1, 2]",
        b"42",
        b'"text"',
        b"null",
        b"",
        deep.encode(),
        b'{"type": "page_view", "client": ' + deep.encode() + b"}",
        b'{"type": "page_view", "pad": "' + b"x" * 80_000 + b'"}',
        view(None),
        view(12.5),
        view(["1.2.3.4"]),
        view({"a": 1}),
        view(True),
        json.dumps({"type": ["page_view"], "client": {"ip": "1.2.3.4"}}).encode(),
        b'{"type": "page_view", "client": {"ip": "1.1.1.1"}, "x": NaN}',
    ]
    records += [view(value) for value in hostile] + [view("1.2.3.4", lang) for lang in hostile]
    return [(None, value) for value in records]


SAFE = re.compile(r"[A-Za-z0-9._~%-]*")


def unsafe_calls(calls: list[dict[str, Any]], host: str) -> list[str]:
    """Calls that are not ``/geo/SEGMENT?lang=VALUE`` with both percent-encoded, on ``host``."""
    bad = []
    for call in calls:
        path, _, query = call["path"].partition("?")
        segment = path.removeprefix("/geo/")
        value = query.removeprefix("lang=")
        ok = (
            path.startswith("/geo/")
            and SAFE.fullmatch(segment)
            and segment not in (".", "..")
            and query.startswith("lang=")
            and SAFE.fullmatch(value)
            and call["host"] == host
        )
        if not ok:
            bad.append(call["path"])
    return bad


async def poison(stack: ChaosStack, scale: float) -> Result:
    """Hostile records: each is a dead letter or a safely encoded call to the configured host;
    the worker never crashes."""
    del scale
    result = Result("poison")
    scene = Scene(stack, "poison")
    rule = geo_rule() | {"params": {"ip": "client.ip", "lang": "client.lang"}}
    worker_settings = {"in_flight": 64, "max_event_bytes": "64KiB"}
    scene.config({"geo": api("/geo/{ip}?lang={lang}", 50.0, 10)}, [rule], worker=worker_settings)
    await scene.start()
    worker = scene.start_worker()
    try:
        records = poison_records()
        await scene.produce(records + [page_view(i) for i in range(5)])
        await scene.drain(60)
        finish(result, scene, {"/geo/": (50.0, 10)}, allow_dead_letters=True)
        host = stack.api_url.removeprefix("http://")
        calls = stack.api_calls(scene.started)
        bad = unsafe_calls(calls, host)
        result.check(
            "every call encoded, to the configured host",
            not bad,
            f"{len(calls)} calls, {len(bad)} unsafe {bad[:3]}",
        )
        result.check("worker alive", worker.alive, "alive" if worker.alive else "exited")
        result.figures["poison_records"] = len(records)
    finally:
        await scene.close()
    return result
