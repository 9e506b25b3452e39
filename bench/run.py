"""``make bench`` / ``python -m bench.run``: start the embedded stack once, run the scenarios,
print one table and write ``bench/results/latest.json``.

Every figure is the median of ``--runs`` runs (each on its own topics, consumer group and Redis
keys, with fresh processes), shown with the min and max, then the issue's goals with PASS or
FAIL. ``--quick``: 300 events, one run, the recipe measured for 5 s at most. ``--only NAME``
(repeatable) runs only those scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .report import goal_results, machine, render, summarize, write_json
from .scenarios import SCENARIOS, Options, Scenario
from .stack import BenchStack, say

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
DEFAULTS = Options()
RUN_TIMEOUT = 600.0  # a safety net; each wait inside a run has its own, tighter, timeout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    names = [s.name for s in SCENARIOS]
    parser.add_argument("--runs", type=int, help="runs per scenario (default 3)")
    parser.add_argument("--events", type=int, help="events per run (default 2000)")
    parser.add_argument(
        "--quick", action="store_true", help="300 events, 1 run, shorter recipe (a smoke test)"
    )
    parser.add_argument(
        "--only", action="append", choices=names, metavar="NAME", help=f"one of {names}"
    )
    parser.add_argument("--share", type=float, default=DEFAULTS.share, help="replay share")
    parser.add_argument(
        "--cold-rate", type=float, default=DEFAULTS.cold_rate, help="cold replay's rate (calls/s)"
    )
    parser.add_argument(
        "--recipe-concurrency",
        type=int,
        default=DEFAULTS.recipe_concurrency,
        help="the recipe agent's concurrency (default 1, Faust's)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (worker logs)")
    parser.add_argument(
        "--show", type=Path, metavar="JSON", help="print the table of a results file and exit"
    )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    options = Options(
        events=args.events or (300 if args.quick else DEFAULTS.events),
        runs=args.runs or (1 if args.quick else DEFAULTS.runs),
        share=args.share,
        cold_rate=args.cold_rate,
        recipe_concurrency=args.recipe_concurrency,
    )
    if args.quick:
        options = dataclasses.replace(options, precision_events=300, recipe_budget=5.0)
    return options


async def run_scenario(stack: BenchStack, scenario: Scenario, options: Options) -> dict[str, Any]:
    say(f"{scenario.name}: {scenario.describe(options)}")
    figures: list[dict[str, float]] = []
    extras: list[dict[str, Any]] = []
    errors: list[str] = []
    for number in range(1, options.runs + 1):
        run = stack.new_run(scenario.name)
        started = time.monotonic()
        say(f"  run {number}/{options.runs} ({run.app_id})")
        try:
            async with asyncio.timeout(RUN_TIMEOUT):
                measured = await scenario.measure(stack, run, options)
        except Exception as exc:
            errors.append(f"run {number}: {type(exc).__name__}: {exc}")
            say(f"  run {number} FAILED: {type(exc).__name__}: {exc}; {run.log_hint}")
            traceback.print_exc()
        else:
            figures.append(measured.figures)
            extras.append(measured.extra)
            shown = ", ".join(f"{k} {v:,.3g}" for k, v in measured.figures.items())
            say(f"  run {number} done in {time.monotonic() - started:.1f}s: {shown}")
        finally:
            await run.stop()
    return {"figures": summarize(figures), "runs": extras, "errors": errors}


def show(path: Path) -> int:
    """Print the table of a results file written earlier."""
    document = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(Options)}
    options = Options(**{k: v for k, v in document["options"].items() if k in known})
    print(render(document["scenarios"], options))
    return 0


async def main(args: argparse.Namespace) -> int:
    options = options_from(args)
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    started_at = datetime.now(UTC)
    stack = BenchStack()
    results: dict[str, dict[str, Any]] = {}
    failed = True
    try:
        say("starting Tansu, Redis and the sandbox API...")
        await stack.start()
        say(
            f"stack up: kafka {stack.kafka.url}, redis {stack.redis_service.url}, "
            f"api {stack.sandbox_url}"
        )
        for scenario in scenarios:
            results[scenario.name] = await run_scenario(stack, scenario, options)
        failed = any(result["errors"] for result in results.values())
    finally:
        say("stopping the stack...")
        keep = args.keep or failed
        with contextlib.suppress(Exception):
            await stack.stop(keep_workdir=keep)
        if keep:
            say(f"logs kept in {stack.workdir}")
    document = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started_at).total_seconds(), 1),
        "machine": machine(),
        "options": dataclasses.asdict(options),
        "scenarios": results,
        "goals": goal_results(results),
    }
    print()
    print(render(results, options))
    print()
    write_json(args.out, document)
    say(f"results written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(show(arguments.show) if arguments.show else asyncio.run(main(arguments)))
