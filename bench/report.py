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

from .options import Options
from .stack import SLOW_LATENCY

__all__ = [
    "FIGURES",
    "GOALS",
    "Figure",
    "Goal",
    "goal_lines",
    "goal_results",
    "machine",
    "render",
    "summarize",
    "table",
    "write_json",
]


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


def _ceiling(options: Options) -> str:
    return "ceiling, one await topic.send() per event"


def _cpu(options: Options) -> str:
    return "user+sys, first output to last"


def _limited(side: str, kind: str) -> tuple[Figure, ...]:
    """The precision figures of one side (``enricher`` or ``recipe``)."""

    def busiest(o: Options) -> str:
        return (
            f"{o.precision_workers} {kind}, limit {o.precision_rate:g}/s burst {o.precision_rate:g}"
        )

    return (
        Figure(f"{side}_max_calls_in_a_second", f"{side}: most calls in a second", note=busiest),
        Figure(f"{side}_violations", f"{side}: seconds over the bucket", note=_violations),
        Figure(f"{side}_excess_calls", f"{side}: calls over the bucket"),
        Figure(
            f"{side}_utilisation",
            f"{side}: utilisation",
            3,
            note=lambda o: "calls/s in whole seconds / limit",
        ),
        Figure(f"{side}_calls", f"{side}: API calls", note=_events),
    )


def _events(options: Options) -> str:
    return f"{options.precision_events} events"


def _violations(options: Options) -> str:
    return "goal 0 (bucket of rate and burst, by whole seconds)"


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
    "overhead": (
        Figure(
            "enricher_events_per_s",
            "enricher events/s",
            note=lambda o: f"in_flight {o.in_flight}, concurrency {o.concurrency}",
        ),
        Figure(
            "client_requests_per_s",
            "bare aiohttp client req/s",
            note=lambda o: f"ceiling, {o.concurrency} concurrent",
        ),
        Figure(
            "passthrough_events_per_s",
            "enricher pass-through events/s",
            note=lambda o: "no rule matches: no API call (its Kafka side)",
        ),
        Figure("forward_events_per_s", "forwarding-only agent events/s", note=_ceiling),
        Figure(
            "recipe_events_per_s",
            "recipe events/s",
            note=lambda o: f"agent concurrency {o.recipe_concurrency}",
        ),
        Figure("enricher_to_recipe", "enricher / recipe", 2, note=lambda o: "goal >= 3"),
        Figure("enricher_to_forward", "enricher / forwarding agent", 2, note=lambda o: "goal > 1"),
        Figure("enricher_to_client", "enricher / bare client", 3, note=lambda o: "goal >= 0.6"),
        Figure("enricher_cpu_ms_per_event", "enricher CPU ms / event", 3, note=_cpu),
        Figure("forward_cpu_ms_per_event", "forwarding agent CPU ms / event", 3, note=_cpu),
        Figure("passthrough_cpu_ms_per_event", "pass-through CPU ms / event", 3, note=_cpu),
        Figure(
            "client_cpu_ms_per_request",
            "bare client CPU ms / request",
            3,
            note=lambda o: "the bench process, while it runs",
        ),
        Figure(
            "one_core_to_client",
            "one-core bound / bare client",
            3,
            note=lambda o: "1 / (pass-through + bare request CPU), over client req/s",
        ),
        Figure("recipe_cpu_ms_per_event", "recipe CPU ms / event", 3, note=_cpu),
        Figure(
            "recipe_api_calls_per_event",
            "recipe API calls / output",
            2,
            note=lambda o: "expect 1 (a check)",
            expect=lambda v, o: abs(v - 1) < 0.01,
        ),
    ),
    "latency-bound": (
        Figure(
            "enricher_events_per_s",
            "enricher events/s (1 worker)",
            1,
            note=lambda o: f"limit {o.slow_rate:g}/s, API {SLOW_LATENCY * 1000:g} ms",
        ),
        Figure("enricher_to_limit", "enricher / limit", 3, note=lambda o: "goal >= 0.98"),
        Figure(
            "recipe_events_per_s",
            "recipe events/s (1 process)",
            1,
            note=lambda o: f"1/latency = {1 / SLOW_LATENCY:g}/s",
        ),
        Figure("recipe_to_limit", "recipe / limit", 3),
        Figure("enricher_to_recipe", "enricher / recipe", 1),
    ),
    "precision": (
        *_limited("enricher", "workers"),
        *_limited("recipe", "processes"),
    ),
    "footprint": (
        Figure(
            "redis_round_trips_per_event",
            "Redis round trips / event",
            2,
            note=lambda o: "goal <= 1.2 (INFO stats reads)",
        ),
        Figure("redis_commands_per_event", "Redis commands / event", 2, note=_commands),
        Figure(
            "worker_peak_rss_mb",
            "worker peak RSS MB",
            note=lambda o: f"goal < 200, in_flight {o.footprint_in_flight}",
        ),
        Figure("worker_rss_mb", "worker RSS MB (end)"),
        Figure("events_per_s", "events/s"),
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
        for figure in FIGURES.get(scenario, ()):
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


@dataclass(frozen=True, slots=True)
class Goal:
    """One of the issue's goals: ``check`` on the ``stat`` (median, min or max) of a figure."""

    scenario: str
    key: str
    text: str
    check: Callable[[float], bool]
    stat: str = "median"


GOALS = (
    Goal("overhead", "enricher_to_recipe", "overhead: enricher >= 3x the recipe", lambda v: v >= 3),
    Goal(
        "overhead",
        "enricher_to_forward",
        "overhead: enricher above the forwarding-only agent",
        lambda v: v > 1,
    ),
    Goal(
        "overhead",
        "enricher_to_client",
        "overhead: enricher >= 60% of the bare aiohttp client",
        lambda v: v >= 0.6,
    ),
    Goal(
        "latency-bound",
        "enricher_to_limit",
        "latency-bound: one worker >= 98% of the limit",
        lambda v: v >= 0.98,
    ),
    Goal(
        "precision",
        "enricher_violations",
        "precision: 0 violations (in every run)",
        lambda v: v == 0,
        stat="max",
    ),
    Goal("precision", "enricher_utilisation", "precision: utilisation >= 95%", lambda v: v >= 0.95),
    Goal(
        "footprint",
        "redis_round_trips_per_event",
        "footprint: <= 1.2 Redis round trips per event (cache off, one API)",
        lambda v: v <= 1.2,
    ),
    Goal(
        "footprint",
        "worker_peak_rss_mb",
        "footprint: worker RSS < 200 MB at in_flight 512 (peak, in every run)",
        lambda v: v < 200,
        stat="max",
    ),
)


def goal_results(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal with the value checked and ``passed`` (None where the figure was not measured)."""
    found = []
    for goal in GOALS:
        stats = results.get(goal.scenario, {}).get("figures", {}).get(goal.key)
        value = stats[goal.stat] if stats else None
        passed = None if value is None else bool(goal.check(value))
        found.append({"goal": goal.text, "stat": goal.stat, "value": value, "passed": passed})
    return found


def goal_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per goal: PASS, FAIL or ``-`` (not measured), the goal and the value checked."""
    lines = []
    for found in goal_results(results):
        mark = {True: "PASS", False: "FAIL", None: "-   "}[found["passed"]]
        value = "" if found["value"] is None else f"  ({found['stat']} {found['value']:,.3g})"
        lines.append(f"{mark}  {found['goal']}{value}")
    return lines


def render(results: dict[str, dict[str, Any]], options: Options) -> str:
    """The table, then the goal lines."""
    return "\n".join([table(results, options), "", "Goals (issue #7):", *goal_lines(results)])


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
