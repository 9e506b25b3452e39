"""``make chaos`` / ``python -m chaos.run``: start the stack once, run the scenarios, print one
table with a pass line per scenario, write ``chaos/results/latest.json``; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .broker import broker_restart
from .faults import api_faults, poison
from .outages import broker_outage, crashes, redis_down, redis_empty, sigterm
from .scenario import Result, Scenario, fmt_seconds
from .secrets import secrets
from .sinks import output_too_large
from .stack import ChaosStack, say

SCENARIOS = (
    Scenario("crashes", "SIGKILL 1 of 3 workers every 10 s for 60 s, restart it", crashes),
    Scenario("sigterm", "SIGTERM 1 of 2 workers while events wait for tokens", sigterm),
    Scenario("redis-down", "Redis down 20 s under load, back empty", redis_down),
    Scenario(
        "redis-empty", "Redis killed and restarted empty 3 times, load over limit", redis_empty
    ),
    Scenario("broker-outage", "broker frozen 15 s under load, then resumed", broker_outage),
    Scenario(
        "broker-restart",
        "broker (S3 storage) stopped, then killed, under load; back 10 s later",
        broker_restart,
    ),
    Scenario(
        "api-faults",
        "5xx, 429 (+absurd Retry-After), timeout, reset, non-JSON, 50 MB, slow drip",
        api_faults,
    ),
    Scenario(
        "poison", "invalid JSON/UTF-8, wrong types, deep nesting, oversize, URL tricks", poison
    ),
    Scenario("output-too-large", "enriched output over the broker's record size", output_too_large),
    Scenario("secrets", "canary API key and Redis password, failures, Redis outage", secrets),
)
NAMES = [s.name for s in SCENARIOS]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
SCENARIO_TIMEOUT = 240.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        choices=NAMES,
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(NAMES)}",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="durations and sizes (1 = the full suite; 0.3 for a quick look)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (worker logs)")
    return parser.parse_args(argv)


async def run_one(stack: ChaosStack, scenario: Scenario, scale: float) -> Result:
    say(f"{scenario.name}: {scenario.summary}")
    started = time.monotonic()
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT):
            result = await scenario.run(stack, scale)
    except Exception as exc:
        traceback.print_exc()
        result = Result(scenario.name, error=f"{type(exc).__name__}: {exc}")
    result.figures["seconds"] = round(time.monotonic() - started, 1)
    say(f"  {'PASS' if result.passed else 'FAIL'} in {result.figures['seconds']}s")
    return result


def table(results: list[Result]) -> str:
    """One row of figures per scenario, then its pass lines."""
    head = ("scenario", "inputs", "lost", "dup", "dead letters", "over limit", "recover s", "")
    rows = [head]
    for r in results:
        acc = r.accounting
        letters = ", ".join(f"{k} {n}" for k, n in sorted(acc.dead_letters.items())) if acc else ""
        rows.append(
            (
                r.name,
                str(acc.produced) if acc else "-",
                str(acc.lost) if acc else "-",
                str(acc.duplicated) if acc else "-",
                letters or "0",
                str(r.over_limit),
                fmt_seconds(r.recover_s),
                "PASS" if r.passed else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for r in results:
        marks = [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in r.checks]
        if r.error:
            marks.append(f"  FAIL error: {r.error}")
        lines += [f"{r.name}:", *marks]
    return "\n".join(lines)


def to_json(result: Result) -> dict[str, Any]:
    acc = result.accounting
    return {
        "passed": result.passed,
        "accounting": None
        if acc is None
        else {
            **{k: v for k, v in asdict(acc).items() if k != "dead_letters"},
            "dead_letters": dict(acc.dead_letters),
        },
        "calls": result.calls,
        "over_limit": result.over_limit,
        "recover_s": None
        if result.recover_s is None or math.isinf(result.recover_s)
        else round(result.recover_s, 2),
        "figures": result.figures,
        "checks": [asdict(c) for c in result.checks],
        "error": result.error,
    }


async def main(args: argparse.Namespace) -> int:
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    started_at = datetime.now(UTC)
    stack = ChaosStack()
    results: list[Result] = []
    try:
        say("starting Tansu, Redis and the sandbox API...")
        await stack.start()
        for scenario in chosen:
            results.append(await run_one(stack, scenario, args.scale))
    finally:
        keep = args.keep or not all(r.passed for r in results)
        with contextlib.suppress(Exception):
            await stack.stop(keep_workdir=keep)
        if keep:
            say(f"logs kept in {stack.workdir}")
    print()
    print(table(results))
    document = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started_at).total_seconds(), 1),
        "scale": args.scale,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "scenarios": {r.name: to_json(r) for r in results},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nresults written to {args.out}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
