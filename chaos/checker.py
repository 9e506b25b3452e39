"""The checker: every input offset accounted for, API calls measured against the limit.

Pure functions over what a scenario recorded: the offsets it produced, the output and
dead-letter records it read back (by their ``enricher-source`` header), and the times the
sandbox API saw each call arrive.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Accounting", "Seen", "account", "calls_over_limit", "max_in_window", "recovery_time"]

JITTER = 0.1  # seconds a call may arrive early at the API and still count as on time


@dataclass
class Seen:
    """What came out for one input (``topic/partition/offset``): ``output`` or a dead-letter
    kind, once per record written."""

    outcomes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Accounting:
    """Every produced offset against what came out."""

    produced: int
    outputs: int
    dead_letters: Counter[str]
    lost: int
    duplicated: int
    unexpected: int  # records whose source was never produced (a bug if non-zero)

    @property
    def dead_lettered(self) -> int:
        return sum(self.dead_letters.values())


def account(produced: Iterable[str], seen: dict[str, Seen]) -> Accounting:
    """Lost: produced, nothing came out. Duplicated: records beyond the first for one input.
    An input counts once, as its first record's outcome (output or dead-letter kind)."""
    wanted = set(produced)
    firsts = Counter(seen[source].outcomes[0] for source in wanted if source in seen)
    return Accounting(
        produced=len(wanted),
        outputs=firsts.pop("output", 0),
        dead_letters=firsts,
        lost=sum(1 for source in wanted if source not in seen),
        duplicated=sum(len(s.outcomes) - 1 for source, s in seen.items() if source in wanted),
        unexpected=sum(1 for source in seen if source not in wanted),
    )


def calls_over_limit(
    times: Sequence[float], rate: float, burst: int, jitter: float = JITTER
) -> int:
    """Calls a GCRA of ``rate``/s and ``burst`` would have refused, allowing each call to arrive
    up to ``jitter`` seconds early (network and scheduling noise between the limiter's grant
    and the API). Refused calls do not use the bucket."""
    interval = 1.0 / rate
    tolerance = (burst - 1) * interval + jitter
    tat, over = float("-inf"), 0
    for t in sorted(times):
        if t < tat - tolerance:
            over += 1
            continue
        tat = max(tat, t) + interval
    return over


def max_in_window(times: Sequence[float], width: float = 1.0) -> int:
    """The most calls in any ``width``-second window (sliding, any start)."""
    ordered, best, start = sorted(times), 0, 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - width:
            start += 1
        best = max(best, end - start + 1)
    return best


def recovery_time(times: Sequence[float], since: float, rate: float, share: float = 0.8) -> float:
    """Seconds from ``since`` until the first 1-second window (sliding, starting at or after
    ``since``) holding at least ``share`` x ``rate`` calls; ``inf`` if none does."""
    need = max(1, int(rate * share))
    ordered = sorted(t for t in times if t >= since)
    for i in range(len(ordered) - need + 1):
        if ordered[i + need - 1] - ordered[i] <= 1.0:
            return ordered[i + need - 1] - since
    return float("inf")
