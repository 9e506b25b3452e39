"""The bench's statistics, table and goal lines (bench/report.py): no stack, no I/O."""

from __future__ import annotations

import math
from typing import Any

from bench.options import Options
from bench.report import FIGURES, GOALS, goal_lines, goal_results, render, summarize, table


def result(**figures: list[float]) -> dict[str, Any]:
    return {"figures": summarize([{k: v[i]} for k, v in figures.items() for i in range(len(v))])}


def test_summarize_gives_median_min_max_and_drops_nan() -> None:
    runs = [{"a": 3.0, "b": 1.0}, {"a": 1.0, "b": math.nan}, {"a": 2.0}]
    stats = summarize(runs)
    assert stats["a"] == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}
    assert stats["b"] == {"median": 1.0, "min": 1.0, "max": 1.0, "runs": [1.0, None]}
    assert summarize([{"c": math.nan}])["c"]["median"] is None
    assert summarize([{"d": 1.0}, {"d": 4.0}])["d"]["median"] == 2.5  # even count: the mean


def test_table_has_a_row_per_measured_figure_aligned_in_columns() -> None:
    results = {
        "overhead": result(enricher_events_per_s=[900.0, 1000.0, 1100.0]),
        "replay-warm": result(replay_api_calls=[0.0]),
    }
    text = table(results, Options())
    lines = text.splitlines()
    assert lines[0].split() == ["scenario", "figure", "median", "min", "max", "note"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 4
    row = lines[2]
    assert row.startswith("overhead") and "1,000" in row and "900" in row and "1,100" in row
    assert "expect 0 (ok)" in lines[3]
    # the numbers are right-aligned under their headers
    assert lines[2].index("1,000") + len("1,000") == lines[0].index("median") + len("median")


def test_table_reports_failed_runs_and_missing_values() -> None:
    figures = summarize([{"enricher_cpu_ms_per_event": math.nan}])
    results = {"overhead": {"figures": figures, "errors": ["run 1: TimeoutError"]}}
    text = table(results, Options())
    assert "FAILED runs" in text
    (cpu,) = [line for line in text.splitlines() if "enricher CPU ms / event" in line]
    assert cpu.split("enricher CPU ms / event")[1].split()[:3] == ["-", "-", "-"]


def test_goals_pass_fail_or_unmeasured() -> None:
    results = {
        "overhead": result(enricher_to_recipe=[3.5, 2.0, 4.0], enricher_to_client=[0.2]),
        "precision": result(enricher_violations=[0.0, 1.0, 0.0]),
    }
    found = {g["goal"]: g for g in goal_results(results)}
    assert found["overhead: enricher >= 3x the recipe"]["passed"] is True  # median 3.5
    assert found["overhead: enricher >= 60% of the bare aiohttp client"]["passed"] is False
    # violations are judged on the worst run
    assert found["precision: 0 violations (in every run)"]["passed"] is False
    assert found["precision: 0 violations (in every run)"]["value"] == 1.0
    assert found["latency-bound: one worker >= 98% of the limit"]["passed"] is None
    lines = goal_lines(results)
    assert len(lines) == len(GOALS)
    assert lines[0].startswith("PASS") and "median 3.5" in lines[0]
    assert any(line.startswith("FAIL") for line in lines)
    assert any(line.startswith("-") for line in lines)


def test_every_goal_names_a_figure_of_its_scenario() -> None:
    for goal in GOALS:
        assert goal.key in {f.key for f in FIGURES[goal.scenario]}, goal
        assert goal.stat in {"median", "min", "max"}


def test_render_is_the_table_then_the_goals() -> None:
    text = render({"overhead": result(enricher_to_recipe=[3.0])}, Options())
    head, tail = text.split("Goals (issue #7):")
    assert "enricher / recipe" in head
    assert tail.strip().splitlines()[0].startswith("PASS")
