"""``enricher status``: the whole fleet at a glance, from the workers' heartbeats, the broker's
offsets and Redis's quota counters.

    workers     heartbeats alive in Redis (a beat expires 10 s after the worker's last one)
    partitions  per input/replay partition: the group's committed offset, about the end offset
                (the broker's, or a worker's highwater if higher: Tansu under-reports), the lag,
                the oldest uncommitted offset in flight, its age, and ``stuck`` (work and no
                committed progress for over 60 s)
    apis        per API, summed over the workers (counters since each worker started): calls by
                outcome, HTTP attempts by result, 429s, calls/s (a 10 s moving rate), limiter
                waits, and the quotas (used/remaining/reset from Redis) with their burn rate and
                when each runs out at the current pace
    cache       lookups and the hit ratio; replays in progress

:func:`aggregate` is pure (tested on its own); :func:`gather_status` does the reading.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from .circuit import read_circuit
from .config import Config
from .errors import ServiceUnavailable
from .health import STALL_AFTER
from .heartbeat import read_heartbeats
from .kafka import kafka_options
from .quota import REDIS_ERRORS, read_usage
from .replay import ReplayRegistry
from .runtime import connect_redis

__all__ = ["aggregate", "gather_status", "render_status", "show_status"]

KAFKA_TIMEOUT: Final = 10.0  # seconds for the offsets; past that, lag is shown as unknown
_CACHE_FIELDS: Final = ("hits", "misses", "waits", "shared", "calls")
_PIPELINE_FIELDS: Final = (
    "submitted",
    "outputs",
    "dead_letters",
    "dropped",
    "abandoned",
    "cancelled",
)

Offsets = dict[tuple[str, int], int | None]


# --- reading -------------------------------------------------------------------------------------


async def _kafka_offsets(config: Config) -> tuple[Offsets, Offsets]:
    """``(committed, end)`` per partition of the input and replay topics.

    Committed offsets are asked through a consumer of the group that subscribes to nothing
    (aiokafka's admin client cannot decode Tansu's OffsetFetch reply without partitions)."""
    consumer = AIOKafkaConsumer(
        **kafka_options(config),
        group_id=config.app_id,
        enable_auto_commit=False,
    )
    try:
        await consumer.start()
        existing = await consumer.topics()  # naming an unknown topic would create it on Tansu
        tps = [
            TopicPartition(topic, p)
            for topic in dict.fromkeys((config.topics.input, config.topics.replay))
            if topic in existing
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        ends: Mapping[TopicPartition, int] = await consumer.end_offsets(tps) if tps else {}
        committed: Offsets = {}
        for tp in tps:
            committed[(tp.topic, tp.partition)] = await consumer.committed(tp)
        return committed, {(tp.topic, tp.partition): ends.get(tp) for tp in tps}
    finally:
        await consumer.stop()


async def gather_status(config: Config, *, redis: aioredis.Redis | None = None) -> dict[str, Any]:
    """Read everything and aggregate it. Raises ServiceUnavailable when Redis cannot be reached;
    an unreachable broker only leaves the lag unknown (``kafka.error``)."""
    client = redis if redis is not None else connect_redis(config)
    try:
        try:
            beats = await read_heartbeats(client, config.app_id)
            usage = [await read_usage(client, config.app_id, api) for api in config.apis.values()]
            replays = await ReplayRegistry(client, config.app_id).list()
            circuits = [await read_circuit(client, config.app_id, name) for name in config.apis]
            now = await _redis_time(client)
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("redis", f"{type(exc).__name__}: {exc}") from None
    finally:
        if redis is None:
            await client.aclose()
    kafka_error = None
    committed: Offsets = {}
    ends: Offsets = {}
    try:
        async with asyncio.timeout(KAFKA_TIMEOUT):
            committed, ends = await _kafka_offsets(config)
    except (KafkaError, OSError, TimeoutError) as exc:
        kafka_error = f"{config.kafka.broker[0]}: {type(exc).__name__}"
    quotas = {u.api: [_quota_dict(q) for q in u.quotas] for u in usage}
    blocked = {u.api: u.blocked_until.timestamp() for u in usage if u.blocked_until is not None}
    return aggregate(
        config,
        beats=beats,
        committed=committed,
        ends=ends,
        quotas=quotas,
        blocked=blocked,
        replays=[r.as_dict() for r in replays if r.active],
        circuits={c.api: c.as_dict() for c in circuits},
        now=now,
        kafka_error=kafka_error,
    )


async def _redis_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return int(seconds) + int(micros) / 1e6


def _quota_dict(q: Any) -> dict[str, Any]:
    return {
        "period": q.period,
        "limit": q.limit,
        "used": q.used,
        "remaining": q.remaining,
        "resets_at": q.resets_at.timestamp(),
    }


# --- aggregating ---------------------------------------------------------------------------------


def aggregate(
    config: Config,
    *,
    beats: Sequence[Mapping[str, Any]],
    committed: Offsets,
    ends: Offsets,
    quotas: Mapping[str, Sequence[Mapping[str, Any]]],
    blocked: Mapping[str, float] | None = None,
    replays: Sequence[Mapping[str, Any]] = (),
    circuits: Mapping[str, Mapping[str, Any]] | None = None,
    now: float,
    kafka_error: str | None = None,
) -> dict[str, Any]:
    """The status object (see :func:`render_status` and the README) from raw readings.

    ``beats``: parsed heartbeats; ``committed``/``ends``: per (topic, partition); ``quotas``:
    per API, ``{period, limit, used, remaining, resets_at}`` (Unix time); ``circuits``: per API,
    ``CircuitState.as_dict()`` (absent: not read); ``now``: Unix time."""
    partitions = _partitions(beats, committed, ends)
    apis = _apis(config, beats, quotas, blocked or {}, now, circuits or {})
    cache = _sum_fields((b.get("cache") or {} for b in beats), _CACHE_FIELDS)
    answered = cache["hits"] + cache["waits"] + cache["shared"]
    lookups = cache["hits"] + cache["misses"] + cache["shared"]
    cache["hit_ratio"] = round(answered / lookups, 4) if lookups else None
    events = {lane: _sum_pipelines(beats, lane) for lane in ("live", "replay")}
    in_flight_events = {
        lane: sum(int((b.get("in_flight") or {}).get(lane, 0)) for b in beats)
        for lane in ("live", "replay")
    }
    known_lags = [p["lag"] for p in partitions if p["lag"] is not None]
    return {
        "app_id": config.app_id,
        "time": _iso(now),
        "workers": {
            "alive": len(beats),
            "list": [_worker(b, now) for b in beats],
        },
        "kafka": {
            "error": kafka_error,
            "note": "end offsets and lag are about (some brokers under-report end offsets)",
        },
        "lag": sum(known_lags) if known_lags else (None if kafka_error else 0),
        "stall_after": STALL_AFTER,
        "stuck": [f"{p['topic']}/{p['partition']}" for p in partitions if p["stuck"]],
        "partitions": partitions,
        "in_flight": {
            "events": in_flight_events,
            "calls": sum(a["in_flight"] for a in apis.values()),
        },
        "apis": apis,
        "open_circuits": [
            name for name, api in apis.items() if (api["circuit"] or {}).get("state") == "open"
        ],
        "half_open_circuits": [
            name for name, api in apis.items() if (api["circuit"] or {}).get("state") == "half-open"
        ],
        "cache": cache,
        "events": events,
        "replays": list(replays),
    }


def _worker(beat: Mapping[str, Any], now: float) -> dict[str, Any]:
    parts = [f"{p['topic']}/{p['partition']}" for p in beat.get("partitions") or []]
    in_flight = beat.get("in_flight") or {}
    return {
        "id": beat["worker"],
        "web_url": beat.get("web_url"),
        "started_at": _iso(float(beat["started_at"])),
        "last_beat_age": round(max(0.0, now - float(beat["last_beat"])), 1),
        "partitions": parts,
        "in_flight": sum(int(v) for v in in_flight.values()),
    }


def _partitions(
    beats: Sequence[Mapping[str, Any]], committed: Offsets, ends: Offsets
) -> list[dict[str, Any]]:
    """One row per partition: the broker's figures, completed by the owning worker's."""
    seen: dict[tuple[str, int], tuple[str, Mapping[str, Any]]] = {}
    for beat in beats:
        for part in beat.get("partitions") or []:
            seen[(part["topic"], int(part["partition"]))] = (str(beat["worker"]), part)
    rows = []
    for key in sorted(set(committed) | set(ends) | set(seen)):
        worker, part = seen.get(key, (None, {}))
        group = committed.get(key)
        if group is None and key not in committed:
            group = part.get("committed")  # the broker was not asked: the worker's view
        candidates = [v for v in (ends.get(key), part.get("highwater")) if v is not None]
        end = max(candidates) if candidates else None
        lag = max(0, end - (group or 0)) if end is not None else None
        rows.append(
            {
                "topic": key[0],
                "partition": key[1],
                "worker": worker,
                "committed": group,
                "end_offset": end,
                "lag": lag,
                "in_flight": int(part.get("in_flight", 0)),
                "oldest_offset": part.get("oldest_offset"),
                "oldest_age": part.get("oldest_age"),
                "stalled_for": part.get("stalled_for", 0.0),
                "stuck": bool(part.get("stuck", False)),
            }
        )
    return rows


def _apis(
    config: Config,
    beats: Sequence[Mapping[str, Any]],
    quotas: Mapping[str, Sequence[Mapping[str, Any]]],
    blocked: Mapping[str, float],
    now: float,
    circuits: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sorted(set(config.apis) | {a for b in beats for a in (b.get("apis") or {})}):
        figures = [(b.get("apis") or {}).get(name) or {} for b in beats]
        calls: Counter[str] = Counter()
        attempts: Counter[str] = Counter()
        for f in figures:
            calls.update(f.get("calls") or {})
            attempts.update(f.get("attempts") or {})
        waits = sum(int(f.get("limiter_waits", 0)) for f in figures)
        wait_seconds = sum(float(f.get("limiter_wait_seconds", 0.0)) for f in figures)
        burn = sum(float(f.get("grants_per_second", 0.0)) for f in figures)
        api = config.apis.get(name)
        out[name] = {
            "rate_limit": api.rate.per_second if api is not None else None,
            "calls": dict(sorted(calls.items())),
            "calls_total": calls.total(),
            "errors": calls.total() - calls.get("ok", 0),
            "attempts": dict(sorted(attempts.items())),
            "attempts_total": attempts.total(),
            "status_429": attempts.get("429", 0),
            "calls_per_second": round(
                sum(float(f.get("calls_per_second", 0.0)) for f in figures), 3
            ),
            "attempts_per_second": round(
                sum(float(f.get("attempts_per_second", 0.0)) for f in figures), 3
            ),
            "in_flight": sum(int(f.get("in_flight", 0)) for f in figures),
            "limiter": {
                "waits": waits,
                "wait_seconds": round(wait_seconds, 3),
                "mean_wait": round(wait_seconds / waits, 4) if waits else None,
                "waiting": sum(int(f.get("waiting", 0)) for f in figures),
            },
            "blocked_until": _iso(blocked[name]) if name in blocked else None,
            "circuit": _circuit(circuits.get(name)),
            "quotas": [_quota_forecast(q, burn, now) for q in quotas.get(name, ())],
        }
    return out


def _circuit(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An API's circuit: ``state`` (closed, open, half-open), the failures in a row, the end of
    the cool-down and whether a probe is out (None: not read)."""
    if state is None:
        return None
    return {
        "state": state["state"],
        "failures": int(state.get("failures", 0)),
        "cool_down_until": state.get("cool_down_until"),
        "probing": bool(state.get("probing", False)),
    }


def _quota_forecast(quota: Mapping[str, Any], burn: float, now: float) -> dict[str, Any]:
    """A quota with its burn rate (units/s, the fleet's token rate) and, at that pace, when it
    runs out (None when it would last until the period resets)."""
    resets_at = float(quota["resets_at"])
    remaining = int(quota["remaining"])
    runs_out_in: float | None = None
    if remaining <= 0:
        runs_out_in = 0.0
    elif burn > 0 and now + remaining / burn < resets_at:
        runs_out_in = remaining / burn
    return {
        "period": quota["period"],
        "limit": int(quota["limit"]),
        "used": int(quota["used"]),
        "remaining": remaining,
        "resets_at": _iso(resets_at),
        "burn_per_second": round(burn, 3),
        "runs_out_in": round(runs_out_in, 1) if runs_out_in is not None else None,
        "runs_out_at": _iso(now + runs_out_in) if runs_out_in is not None else None,
    }


def _sum_fields(items: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> dict[str, Any]:
    totals: dict[str, Any] = dict.fromkeys(fields, 0)
    for item in items:
        for name in fields:
            totals[name] += int(item.get(name, 0))
    return totals


def _sum_pipelines(beats: Sequence[Mapping[str, Any]], lane: str) -> dict[str, Any]:
    stats = [(b.get("pipelines") or {}).get(lane) or {} for b in beats]
    totals = _sum_fields(stats, _PIPELINE_FIELDS)
    kinds: Counter[str] = Counter()
    for s in stats:
        kinds.update(s.get("dead_letters_by_kind") or {})
    totals["dead_letters_by_kind"] = dict(sorted(kinds.items()))
    return totals


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


# --- rendering -----------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86_400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86_400:.1f}d"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def render_status(status: Mapping[str, Any]) -> str:
    """The compact human view of :func:`aggregate`'s object."""
    lines = [f"app {status['app_id']} at {status['time']}"]
    workers = status["workers"]
    lines.append(f"workers alive: {workers['alive']}")
    if workers["list"]:
        lines += [
            "  " + line
            for line in _table(
                ["worker", "url", "partitions", "in flight", "beat"],
                [
                    [
                        w["id"],
                        w["web_url"],
                        len(w["partitions"]),
                        w["in_flight"],
                        f"{w['last_beat_age']}s ago",
                    ]
                    for w in workers["list"]
                ],
            )
        ]
    lag = status["lag"]
    kafka = status["kafka"]
    lag_text = "unknown" if lag is None else f"about {lag}"
    extra = f" (kafka: {kafka['error']})" if kafka.get("error") else ""
    stuck = status["stuck"]
    lines.append(
        f"lag: {lag_text}{extra}; stuck partitions: {', '.join(stuck) if stuck else 'none'}"
    )
    rows = [
        [
            f"{p['topic']}/{p['partition']}",
            p["worker"] or "-",
            p["committed"],
            p["end_offset"],
            p["lag"],
            p["in_flight"],
            p["oldest_offset"],
            _duration(p["oldest_age"]) if p["oldest_age"] is not None else None,
            "STUCK" if p["stuck"] else "",
        ]
        for p in status["partitions"]
    ]
    if rows:
        headers = [
            "partition",
            "worker",
            "committed",
            "end~",
            "lag~",
            "in flight",
            "oldest",
            "age",
            "",
        ]
        lines += ["  " + line for line in _table(headers, rows)]
    flight = status["in_flight"]
    lines.append(
        f"in flight: {flight['events']['live']} live + {flight['events']['replay']} replayed "
        f"event(s), {flight['calls']} call(s)"
    )
    api_rows = []
    for name, api in status["apis"].items():
        limiter = api["limiter"]
        api_rows.append(
            [
                name,
                f"{api['calls_per_second']:g}/{api['rate_limit']:g}"
                if api["rate_limit"]
                else api["calls_per_second"],
                api["calls_total"],
                api["errors"],
                api["attempts_total"],
                api["status_429"],
                f"{limiter['wait_seconds']:g}s"
                + (
                    f" ({limiter['mean_wait'] * 1000:.0f}ms avg)"
                    if limiter["mean_wait"] is not None
                    else ""
                ),
                api["in_flight"],
                (api["circuit"] or {}).get("state"),
            ]
        )
    if api_rows:
        lines.append("apis:")
        headers = [
            "api",
            "calls/s of limit",
            "calls",
            "errors",
            "attempts",
            "429s",
            "limiter wait",
            "in flight",
            "circuit",
        ]
        lines += ["  " + line for line in _table(headers, api_rows)]
    quota_rows = []
    for name, api in status["apis"].items():
        for q in api["quotas"]:
            runs_out = (
                "not before reset"
                if q["runs_out_in"] is None
                else f"in {_duration(q['runs_out_in'])}"
            )
            if q["remaining"] <= 0:
                runs_out = "spent"
            quota_rows.append(
                [
                    f"{name}/{q['period']}",
                    f"{q['used']}/{q['limit']}",
                    q["remaining"],
                    q["resets_at"],
                    f"{q['burn_per_second']:g}/s",
                    runs_out,
                ]
            )
    if quota_rows:
        lines.append("quotas:")
        lines += [
            "  " + line
            for line in _table(["quota", "used", "left", "resets", "burn", "runs out"], quota_rows)
        ]
    held = [
        f"{name} ({api['circuit']['state']}, {api['circuit']['failures']} failures)"
        for name, api in status["apis"].items()
        if api["circuit"] is not None and api["circuit"]["state"] != "closed"
    ]
    lines.append(f"open circuits: {', '.join(held) if held else 'none'}")
    cache = status["cache"]
    ratio = "-" if cache["hit_ratio"] is None else f"{cache['hit_ratio']:.0%}"
    lines.append(
        f"cache: hit ratio {ratio} ({cache['hits']} hits, {cache['waits']} waits, "
        f"{cache['shared']} shared, {cache['misses']} misses)"
    )
    live = status["events"]["live"]
    kinds = ", ".join(f"{k} {n}" for k, n in live["dead_letters_by_kind"].items())
    lines.append(
        f"events: {live['outputs']} output(s), {live['dead_letters']} dead letter(s)"
        + (f" ({kinds})" if kinds else "")
        + f", {live['dropped']} dropped"
    )
    replays = status["replays"]
    if not replays:
        lines.append("replays in progress: none")
    else:
        lines.append("replays in progress:")
        lines += [
            "  " + line
            for line in _table(
                ["id", "state", "done", "of", "note"],
                [
                    [r["id"], r["state"], r["finished"], r["selected"], r.get("note") or ""]
                    for r in replays
                ],
            )
        ]
    return "\n".join(lines)


async def show_status(config: Config, *, as_json: bool) -> str:
    """What ``enricher status`` prints. Raises ServiceUnavailable (Redis unreachable)."""
    status = await gather_status(config)
    return json.dumps(status, indent=2) if as_json else render_status(status)
