"""What ``enricher dev`` shows: its figures (:class:`Snapshot`), a live ``rich`` view for a
terminal, one-line progress reports and the final summary for unattended runs."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .quota import QuotaUsage

__all__ = ["ApiFigures", "Snapshot", "progress_line", "render", "summary_lines"]


@dataclass(frozen=True, slots=True)
class ApiFigures:
    """What one API's sandbox saw (its ``/stats`` body), against the API's configured limits."""

    name: str
    rate: float  # calls per second
    burst: int
    stats: dict[str, Any]
    quotas: tuple[QuotaUsage, ...]

    @property
    def limit(self) -> float:
        """The most calls the API may see in any one second: ``rate + burst``."""
        return self.rate + self.burst

    @property
    def max_in_any_second(self) -> int:
        return int(self.stats["max_calls_in_any_second"])

    @property
    def exceeded(self) -> bool:
        over_quota = any(q.used > q.limit for q in self.quotas)
        return self.max_in_any_second > self.limit or over_quota

    def recent_rate(self, now: float, seconds: int = 3) -> float:
        """Calls per second over the last ``seconds`` complete seconds (``now``: epoch)."""
        per_second, last = self.stats["calls_per_second"], int(now)
        calls = sum(int(per_second.get(str(s), 0)) for s in range(last - seconds, last))
        return calls / seconds


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything shown, at one moment. ``workers``: (name, pid, exit code or None)."""

    elapsed: float
    produced: int
    outputs: int
    enriched: int
    dead_letters: Counter[str]
    recent: tuple[dict[str, Any], ...]
    apis: tuple[ApiFigures, ...]
    workers: tuple[tuple[str, int, int | None], ...]

    @property
    def pending(self) -> int:
        """Produced but not yet out (waiting for a token, a worker, or in flight)."""
        return max(0, self.produced - self.outputs - self.dead_letters.total())

    @property
    def workers_died(self) -> list[str]:
        return [f"{name} (exit {code})" for name, _, code in self.workers if code is not None]

    @property
    def retried(self) -> int:
        """Failed attempts (429, 5xx) less those that ended as dead letters: they were retried."""
        failed = sum(int(a.stats["rejected_429"]) + int(a.stats["errors_5xx"]) for a in self.apis)
        return max(0, failed - self.dead_letters["http_status"])

    @property
    def exceeded(self) -> list[str]:
        return [api.name for api in self.apis if api.exceeded]


def _kinds(counts: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.most_common()) or "none"


def _quota_text(quotas: tuple[QuotaUsage, ...]) -> str:
    return "; ".join(f"{q.used}/{q.limit} per {q.period}" for q in quotas) or "no quota"


def _enrichment_text(event: dict[str, Any], width: int = 90) -> str:
    text = json.dumps(event.get("enrichment"), separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def render(snapshot: Snapshot, now: float) -> RenderableType:
    """The live view: events in and out, each API against its limit, the latest outputs."""
    s = snapshot
    events = Table.grid(padding=(0, 2))
    events.add_row("events produced", f"{s.produced:,}", f"{s.produced / max(s.elapsed, 1):.0f}/s")
    passed = s.outputs - s.enriched
    events.add_row(
        "outputs", f"{s.outputs:,}", f"enriched {s.enriched:,}, passed through {passed:,}"
    )
    events.add_row("dead letters", f"{s.dead_letters.total():,}", _kinds(s.dead_letters))
    events.add_row("not yet out", f"{s.pending:,}", "waiting for an API token, or in flight")
    events.add_row("retried attempts", f"{s.retried:,}", "after a 429 or 5xx, within the limit")
    alive = sum(code is None for _, _, code in s.workers)
    events.add_row("workers", f"{alive}/{len(s.workers)}", ", ".join(s.workers_died) or "running")

    apis = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("API", "calls/s", "limit", "max in any 1 s", "429", "5xx", "quota used"):
        apis.add_column(column, justify="left" if column in ("API", "quota used") else "right")
    for api in s.apis:
        style = "bold red" if api.exceeded else "green"
        apis.add_row(
            api.name,
            f"{api.recent_rate(now):.1f}",
            f"{api.rate:g}/s + {api.burst}",
            Text(f"{api.max_in_any_second} of {api.limit:g}", style=style),
            str(api.stats["rejected_429"]),
            str(api.stats["errors_5xx"]),
            _quota_text(api.quotas),
        )

    recent = Table.grid(padding=(0, 1))
    for event in reversed(s.recent):
        recent.add_row(
            str(event.get("type")), str(event.get("user_id", "")), _enrichment_text(event)
        )
    if not s.recent:
        recent.add_row(Text("none yet: workers are joining the consumer group...", style="dim"))
    return Panel(
        Group(events, apis, Text("latest enriched events", style="bold"), recent),
        title=f"enricher dev · {s.elapsed:.0f}s",
        subtitle="Ctrl-C stops everything",
    )


def progress_line(snapshot: Snapshot, now: float) -> str:
    """One line for unattended runs."""
    s = snapshot
    parts = [
        f"[{s.elapsed:4.0f}s] produced {s.produced}, outputs {s.outputs} "
        f"(enriched {s.enriched}), dead letters {s.dead_letters.total()}, pending {s.pending}"
    ]
    for api in s.apis:
        parts.append(
            f"{api.name} {api.recent_rate(now):.1f}/s (max {api.max_in_any_second} of "
            f"{api.limit:g})"
        )
    alive = sum(code is None for _, _, code in s.workers)
    parts.append(f"workers {alive}/{len(s.workers)}")
    return " | ".join(parts)


def summary_lines(snapshot: Snapshot) -> list[str]:
    """The final report; ``enriched: N`` and ``limits: ...`` lines are meant to be parsed."""
    s = snapshot
    lines = [
        f"summary after {s.elapsed:.1f}s:",
        f"  events produced: {s.produced}",
        f"  outputs: {s.outputs}",
        f"  enriched: {s.enriched}",
        f"  passed through: {s.outputs - s.enriched}",
        f"  dead letters: {s.dead_letters.total()} ({_kinds(s.dead_letters)})",
        f"  not yet out: {s.pending}",
        f"  retried attempts: {s.retried}",
    ]
    for api in s.apis:
        st = api.stats
        lines.append(
            f"  api {api.name}: {st['calls']} calls ({st['rejected_429']} 429, "
            f"{st['errors_5xx']} 5xx), max {api.max_in_any_second} calls in any second, "
            f"limit {api.rate:g}/s + burst {api.burst} = {api.limit:g}"
            + (": EXCEEDED" if api.exceeded else "")
        )
        for q in api.quotas:
            lines.append(
                f"  quota {api.name} {q.limit}/{q.period}: used {q.used}, left {q.remaining}"
            )
    lines.append(f"  workers: {len(s.workers)} started, {len(s.workers_died)} died")
    exceeded = ", ".join(s.exceeded)
    lines.append(f"  limits: {'exceeded by ' + exceeded if exceeded else 'none exceeded'}")
    return lines
