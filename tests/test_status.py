"""Stuck-partition logic on an injected clock, status aggregation and rendering, JSON log lines,
and ``enricher status`` without Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from enricher.config import Config, load_config
from enricher.health import STALL_AFTER, ProgressWatch
from enricher.heartbeat import Heartbeat
from enricher.logs import JsonFormatter
from enricher.monitor import WorkerMonitor
from enricher.services import find_free_port
from enricher.status import aggregate, render_status


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch() -> tuple[ProgressWatch, Clock]:
    clock = Clock()
    return ProgressWatch(clock=clock), clock


def test_an_idle_partition_is_never_stuck() -> None:
    w, clock = watch()
    for _ in range(5):
        state = w.observe("in", 0, committed=10, highwater=10)
        clock.now += 60
    assert not state.stuck and state.stalled_for == 0 and state.lag == 0


def test_in_flight_without_committed_progress_is_stuck_after_the_threshold() -> None:
    w, clock = watch()
    started = clock.now
    w.observe("in", 0, committed=10, highwater=12, in_flight=2, oldest=(10, started))
    clock.now += STALL_AFTER - 1
    state = w.observe("in", 0, committed=10, highwater=12, in_flight=2, oldest=(10, started))
    assert not state.stuck and state.oldest_offset == 10
    assert state.oldest_age == STALL_AFTER - 1
    clock.now += 2
    state = w.observe("in", 0, committed=10, highwater=12, in_flight=2, oldest=(10, started))
    assert state.stuck and state.stalled_for == STALL_AFTER + 1 and state.lag == 2


def test_committed_progress_keeps_a_busy_partition_healthy() -> None:
    w, clock = watch()
    for step in range(10):  # busy for 10 minutes, committing all the while
        state = w.observe(
            "in",
            0,
            committed=100 * step,
            highwater=100 * step + 50,
            in_flight=50,
            oldest=(100 * step, clock.now - 1),
        )
        assert not state.stuck
        clock.now += 60
    # ... until the commit stops moving
    for _ in range(2):
        state = w.observe("in", 0, committed=900, highwater=1000, in_flight=50, oldest=(900, 0.0))
        clock.now += 40
    assert state.stuck


def test_lag_with_nothing_in_flight_counts_as_work() -> None:
    # an agent that died: records wait, nothing is in flight, nothing is committed
    w, clock = watch()
    w.observe("in", 3, committed=5, highwater=9)
    clock.now += STALL_AFTER + 5
    state = w.observe("in", 3, committed=5, highwater=9)
    assert state.stuck and state.in_flight == 0 and state.oldest_offset is None


def test_the_stall_clock_starts_when_work_arrives_not_at_the_last_commit() -> None:
    w, clock = watch()
    w.observe("in", 0, committed=10, highwater=10)
    clock.now += 3600  # idle for an hour, then one event arrives
    state = w.observe("in", 0, committed=10, highwater=11, in_flight=1, oldest=(10, clock.now))
    assert not state.stuck and state.stalled_for == 0
    clock.now += 5
    state = w.observe("in", 0, committed=11, highwater=11)
    assert not state.stuck and state.stalled_for == 0


def test_an_event_in_flight_before_the_first_look_counts_from_its_start() -> None:
    w, clock = watch()
    state = w.observe(
        "in", 0, committed=None, highwater=1, in_flight=1, oldest=(0, clock.now - STALL_AFTER - 1)
    )
    # nothing was seen to commit before: the stall counts from the first look, not earlier
    assert not state.stuck
    clock.now += STALL_AFTER + 1
    assert w.observe("in", 0, committed=None, highwater=1, in_flight=1, oldest=(0, 0.0)).stuck


def test_forget_drops_partitions_no_longer_assigned() -> None:
    w, clock = watch()
    w.observe("in", 0, committed=1, highwater=5)
    w.forget([("in", 1)])
    clock.now += STALL_AFTER * 2
    # seen afresh: its stall clock restarts
    assert not w.observe("in", 0, committed=1, highwater=5).stuck


# --- aggregation ---------------------------------------------------------------------------------


def config(tmp_path: Path, redis_url: str = "redis://127.0.0.1:6379/0") -> Config:
    data = {
        "app_id": "s1",
        "redis": {"url": redis_url},
        "topics": {"input": "in", "output": "out", "dead_letter": "dlq", "replay": "rep"},
        "apis": {"geo": {"url": "http://127.0.0.1:1/geo/{ip}", "rate": "10/s"}},
        "enrichments": [{"api": "geo", "params": {"ip": "ip"}, "into": "geo"}],
    }
    path = tmp_path / "enricher.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def beat(worker: str, partition: int, calls: int, **api: Any) -> dict[str, Any]:
    figures = {
        "calls": {"ok": calls, "timeout": 1},
        "attempts": {"2xx": calls, "429": 2, "timeout": 1},
        "in_flight": 3,
        "waiting": 1,
        "limiter_waits": calls + 3,
        "limiter_wait_seconds": 1.5,
        "calls_per_second": 2.0,
        "attempts_per_second": 2.5,
        "grants_per_second": 2.5,
        **api,
    }
    return {
        "worker": worker,
        "started_at": 1_000.0,
        "last_beat": 1_999.0,
        "web_url": f"http://127.0.0.1:{partition + 8000}",
        "partitions": [
            {
                "topic": "in",
                "partition": partition,
                "committed": 10,
                "highwater": 20,
                "lag": 10,
                "in_flight": 4,
                "oldest_offset": 10,
                "oldest_age": 70.0,
                "stalled_for": 70.0 if partition == 1 else 0.0,
                "stuck": partition == 1,
            }
        ],
        "in_flight": {"live": 4, "replay": 0},
        "apis": {"geo": figures},
        "cache": {"hits": 6, "misses": 2, "waits": 1, "shared": 1, "calls": 1},
        "pipelines": {
            "live": {"outputs": calls, "dead_letters": 1, "dead_letters_by_kind": {"timeout": 1}},
            "replay": {},
        },
    }


def test_aggregate_sums_workers_and_forecasts_quotas(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    beats = [beat("a:1:8000", 0, 10), beat("b:2:8001", 1, 20)]
    status = aggregate(
        cfg,
        beats=beats,
        committed={("in", 0): 10, ("in", 1): 10, ("in", 2): 7},
        ends={("in", 0): 15, ("in", 1): 20, ("in", 2): 7},  # partition 0: under-reported
        quotas={
            "geo": [
                {"period": "day", "limit": 100, "used": 90, "remaining": 10, "resets_at": 5000.0},
                {
                    "period": "month",
                    "limit": 10**6,
                    "used": 90,
                    "remaining": 10**6 - 90,
                    "resets_at": 3000.0,
                },
            ]
        },
        replays=[{"id": "r1", "state": "running", "finished": 3, "selected": 9, "note": ""}],
        now=2000.0,
    )
    assert status["workers"]["alive"] == 2
    parts = {p["partition"]: p for p in status["partitions"]}
    assert parts[0]["end_offset"] == 20 and parts[0]["lag"] == 10  # the worker's highwater wins
    assert parts[2]["lag"] == 0 and parts[2]["worker"] is None
    assert status["lag"] == 20 and status["stuck"] == ["in/1"]
    geo = status["apis"]["geo"]
    assert geo["calls"] == {"ok": 30, "timeout": 2} and geo["errors"] == 2
    assert geo["attempts_total"] == 30 + 4 + 2 and geo["status_429"] == 4
    assert geo["calls_per_second"] == 4.0 and geo["in_flight"] == 6
    assert geo["limiter"]["waits"] == 36 and geo["limiter"]["wait_seconds"] == 3.0
    day, month = geo["quotas"]
    assert day["burn_per_second"] == 5.0 and day["runs_out_in"] == 2.0
    assert month["runs_out_in"] is None  # resets first
    assert status["cache"]["hit_ratio"] == round((12 + 2 + 2) / (12 + 4 + 2), 4)
    assert status["events"]["live"]["dead_letters_by_kind"] == {"timeout": 2}
    assert status["in_flight"] == {"events": {"live": 8, "replay": 0}, "calls": 6}
    text = render_status(status)
    assert "workers alive: 2" in text and "STUCK" in text and "r1" in text
    assert "geo/day" in text and "in 2s" in text
    json.dumps(status)  # JSON-ready


def test_aggregate_without_workers_or_kafka(tmp_path: Path) -> None:
    status = aggregate(
        config(tmp_path),
        beats=[],
        committed={},
        ends={},
        quotas={},
        now=0.0,
        kafka_error="kafka://x: KafkaConnectionError",
    )
    assert status["workers"]["alive"] == 0 and status["lag"] is None
    assert status["apis"]["geo"]["calls_total"] == 0
    assert "lag: unknown" in render_status(status)


# --- logs ----------------------------------------------------------------------------------------


def test_json_log_lines_carry_extra_fields_and_exceptions() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("enricher.x", logging.WARNING, "f.py", 1, "hello %s", ("you",), None)
    record.partition = 3
    line = json.loads(formatter.format(record))
    assert line["message"] == "hello you" and line["level"] == "warning"
    assert line["logger"] == "enricher.x" and line["partition"] == 3 and "time" in line
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "faust", logging.ERROR, "f.py", 1, "\x1b[31mred\x1b[0m", None, sys.exc_info()
        )
    line = json.loads(formatter.format(record))
    assert line["message"] == "red" and line["exc_type"] == "ValueError"
    assert "boom" in line["traceback"]


# --- the command without Redis -------------------------------------------------------------------


async def test_status_exits_1_with_one_line_when_redis_is_unreachable(tmp_path: Path) -> None:
    config(tmp_path, redis_url=f"redis://127.0.0.1:{find_free_port()}/0")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "enricher",
        "status",
        "--config",
        str(tmp_path / "enricher.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1, (out, err)
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("enricher: redis unavailable"), lines


async def test_heartbeats_are_skipped_quietly_while_redis_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path)
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{find_free_port()}/0", socket_connect_timeout=0.5
    )
    heartbeat = Heartbeat(WorkerMonitor(cfg, web_port=1234), client)
    try:
        with caplog.at_level(logging.INFO, logger="enricher.heartbeat"):
            assert await heartbeat.beat() is False
            assert await heartbeat.beat() is False
    finally:
        await heartbeat.close()
        await client.aclose()
    warnings = [r for r in caplog.records if r.name == "enricher.heartbeat"]
    assert len(warnings) == 1 and "Redis unavailable" in warnings[0].getMessage()
