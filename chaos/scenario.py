"""What a scenario returns, and the pieces most scenarios share (configs, events, checks)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from enricher.config import config_from_dict

from .checker import Accounting, account, calls_over_limit, max_in_window
from .stack import ChaosStack, Scene

__all__ = [
    "Check",
    "Result",
    "Scenario",
    "api",
    "finish",
    "geo_rule",
    "page_view",
    "retry_limits",
]


@dataclass(frozen=True)
class Check:
    """One pass line: what must hold, whether it did, and the figure that says so."""

    name: str
    ok: bool
    detail: str


@dataclass
class Result:
    """A scenario's figures and checks (``passed`` when every check holds)."""

    name: str
    accounting: Accounting | None = None
    calls: int = 0
    over_limit: int = 0
    recover_s: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(check.ok for check in self.checks)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))


@dataclass(frozen=True)
class Scenario:
    """A named scenario: ``run(stack, scale)`` with ``scale`` 1.0 for ``make chaos``; the
    tests run it smaller."""

    name: str
    summary: str
    run: Callable[[ChaosStack, float], Awaitable[Result]]


def page_view(i: int, kind: str = "page_view") -> tuple[bytes | None, bytes]:
    """Event ``i`` as a (key, value) record: its own IP, keyed by user."""
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    event = {"type": kind, "user": f"u{i}", "seq": i, "client": {"ip": ip}}
    return f"u{i % 97}".encode(), json.dumps(event).encode()


def api(path: str, rate: float, burst: int, **settings: Any) -> dict[str, Any]:
    """An API on the sandbox at ``path`` (a URL template), short timeouts and retries."""
    return {
        "url": path,
        "rate": f"{rate:g}/s",
        "burst": burst,
        "timeout": "1s",
        "concurrency": 32,
        "retry": {"attempts": 3, "backoff": "50ms..300ms", "max_retry_after": "2s"},
        **settings,
    }


def geo_rule(api_name: str = "geo", kind: str = "page_view") -> dict[str, Any]:
    """Events of type ``kind`` call ``api_name`` with their ``client.ip``; the answer lands at
    ``enrichment.<api_name>``."""
    return {
        "when": {"type": kind},
        "api": api_name,
        "params": {"ip": "client.ip"},
        "into": api_name,
    }


def retry_limits(deadline: str, budget: float) -> dict[str, Any]:
    """``retry.deadline`` and ``retry.budget`` when this enricher's config knows them (they are
    newer than this suite), else nothing: bounded retries are then checked by attempts alone."""
    retry = {"deadline": deadline, "budget": budget}
    probe = {"apis": {"a": {"url": "http://h/{x}", "rate": "1/s", "retry": retry}}}
    try:
        config_from_dict(probe)
    except Exception:
        return {}
    return {"deadline": deadline, "budget": budget}


def finish(
    result: Result,
    scene: Scene,
    limits: dict[str, tuple[float, int]],
    *,
    allow_duplicates: int = 0,
    allow_dead_letters: bool = False,
) -> Accounting:
    """Account for every offset and check the API limits (``limits``: path prefix → (rate,
    burst)); adds the common pass lines."""
    acc = result.accounting = account(scene.produced, scene.seen)
    calls = scene.stack.api_calls(scene.started)
    result.calls = len(calls)
    over, peaks = 0, []
    for prefix, (rate, burst) in limits.items():
        times = [c["time"] for c in calls if c["path"].startswith(prefix)]
        over += calls_over_limit(times, rate, burst)
        peaks.append(f"{prefix} max {max_in_window(times)}/s of {rate:g}+{burst}")
    result.over_limit = over
    dups = Counter(s.rsplit("/", 1)[0] for s, seen in scene.seen.items() if len(seen.outcomes) > 1)
    if dups:
        result.figures["duplicated_by_partition"] = dict(dups)
    result.figures["peaks"] = peaks
    result.check("0 lost", acc.lost == 0 and acc.unexpected == 0, f"{acc.lost} lost")
    dup_ok = acc.duplicated <= allow_duplicates
    result.check(f"duplicates <= {allow_duplicates}", dup_ok, f"{acc.duplicated} duplicated")
    result.check("0 calls over the limit", over == 0, f"{over} over; " + "; ".join(peaks))
    if not allow_dead_letters:
        result.check("0 dead letters", acc.dead_lettered == 0, f"{acc.dead_lettered} dead letters")
    crashed = [w.log_path.name for w in scene.workers if w.crashed]
    result.check("no worker crashed", not crashed, f"crashed: {crashed or 'none'}")
    return acc


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return "never" if math.isinf(value) else f"{value:.1f}"
