"""Medians, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .scenarios import FAST_RATE, Options

__all__ = ["FIGURES", "Figure", "machine", "summarize", "table", "write_json"]


@dataclass(frozen=True, slots=True)
class Figure:
    key: str
    label: str
    digits: int = 0  # decimals shown
    note: Callable[[Options], str] = lambda _: ""
    expect: Callable[[float, Options], bool] | None = None  # checked on the median


def _trips(options: Options) -> str:
    return "INFO stats reads"


def _commands(options: Options) -> str:
    return "Lua's included"


FIGURES: dict[str, tuple[Figure, ...]] = {
    "replay-warm": (
        Figure("replay_events_per_s", "replay events/s"),
        Figure(
            "replay_api_calls",
            "API calls during the replay",
            note=lambda o: "expect 0",
            expect=lambda v, o: v == 0,
        ),
        Figure("live_events_per_s", "live events/s (cache filling)"),
        Figure("live_api_calls", "API calls live", note=lambda o: f"expect {o.events}"),
        Figure("replay_redis_round_trips_per_event", "Redis round trips / event", 2, note=_trips),
        Figure("replay_redis_commands_per_event", "Redis commands / event", 2, note=_commands),
        Figure("worker_rss_mb", "worker RSS MB (end)"),
    ),
    "replay-cold": (
        Figure("replay_events_per_s", "replay events/s"),
        Figure(
            "replay_api_calls",
            "API calls during the replay",
            note=lambda o: f"expect {o.events}",
            expect=lambda v, o: v == o.events,
        ),
        Figure(
            "replay_calls_per_s",
            "replay calls/s (burst excluded)",
            1,
            note=lambda o: f"share {o.share:g} x {o.cold_rate:g}/s = {o.share * o.cold_rate:g}/s",
        ),
        Figure(
            "replay_limit_ratio",
            "replay calls/s / (share x rate)",
            3,
            note=lambda o: "expect 1 (<= 1.02)",
            expect=lambda v, o: 0.9 <= v <= 1.02,
        ),
        Figure("replay_redis_round_trips_per_event", "Redis round trips / event", 2, note=_trips),
        Figure("replay_redis_commands_per_event", "Redis commands / event", 2, note=_commands),
        Figure("worker_rss_mb", "worker RSS MB (end)"),
    ),
    "live-overhead": (
        Figure(
            "worker_events_per_s",
            "worker events/s",
            note=lambda o: f"limit {FAST_RATE:g}/s, in_flight {o.in_flight}",
        ),
        Figure(
            "client_requests_per_s",
            "bare aiohttp client req/s",
            note=lambda o: f"ceiling, {o.concurrency} concurrent",
        ),
        Figure("worker_to_client_ratio", "worker / client", 3, note=lambda o: "goal >= 0.6"),
        Figure("worker_cpu_ms_per_event", "worker CPU ms / event", 3, note=lambda o: "user+sys"),
        Figure(
            "worker_cpu_share",
            "worker CPU, share of one core",
            2,
            note=lambda o: "CPU ms/event x events/s",
        ),
        Figure(
            "redis_round_trips_per_event",
            "Redis round trips / event",
            2,
            note=lambda o: "goal <= 1.2",
        ),
        Figure("redis_commands_per_event", "Redis commands / event", 2, note=_commands),
        Figure("worker_rss_mb", "worker RSS MB (end)"),
    ),
}


def _clean(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def summarize(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per figure: median, min, max and every run's value (NaN dropped from the stats)."""
    keys = dict.fromkeys(key for run in runs for key in run)
    found: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [run[key] for run in runs if key in run]
        good = [v for v in values if _clean(v) is not None]
        found[key] = {
            "median": statistics.median(good) if good else None,
            "min": min(good) if good else None,
            "max": max(good) if good else None,
            "runs": [_clean(v) for v in values],
        }
    return found


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(results: dict[str, dict[str, Any]], options: Options) -> str:
    """One table: a row per figure, median/min/max of the runs, and a note."""
    header = ("scenario", "figure", "median", "min", "max", "note")
    rows: list[tuple[str, ...]] = []
    for scenario, result in results.items():
        stats: dict[str, dict[str, Any]] = result.get("figures", {})
        if result.get("errors"):
            rows.append((scenario, "FAILED runs", str(len(result["errors"])), "", "", ""))
        for figure in FIGURES[scenario]:
            if figure.key not in stats:
                continue
            s = stats[figure.key]
            note = figure.note(options)
            if figure.expect is not None and s["median"] is not None:
                note = f"{note} {'(ok)' if figure.expect(s['median'], options) else '(MISSED)'}"
            numbers = (_number(s[k], figure.digits) for k in ("median", "min", "max"))
            rows.append((scenario, figure.label, *numbers, note.strip()))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {2, 3, 4}

    def line(row: Sequence[str]) -> str:
        cells = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def machine() -> dict[str, Any]:
    model = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
