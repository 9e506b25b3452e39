"""Watching replays: the progress of one (a bar on a terminal, lines otherwise), ``replay
status`` (one in detail, or the recent ones), and ``replay cancel``."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from .config import Config
from .errors import BadArgument, EnricherError
from .quota import replay_usage
from .replay import Replay, ReplayRegistry
from .replay_plan import human
from .runtime import connect_redis

__all__ = ["cancel_replay", "check_id", "replay_status", "watch"]

Echo = Callable[..., None]
POLL = 0.5  # seconds between looks at the registry
LINE_EVERY = 5.0  # seconds between progress lines without a terminal
_ID_RE = re.compile(r"r\d{8}T\d{6}-[0-9a-f]{6}")


def check_id(replay_id: str) -> str:
    if not _ID_RE.fullmatch(replay_id):
        raise BadArgument("ID", f"not a replay id (like r20250131T123456-3f9a2c): {replay_id!r}")
    return replay_id


def _detail(replay: Replay) -> str:
    return (
        f"re-fed {replay.refed:,} · enriched {replay.outputs:,} · dead letters "
        f"{replay.dead_letters:,} · dropped {replay.dropped:,} · cancelled "
        f"{replay.cancelled_events:,}"
    )


def _short(replay: Replay) -> str:
    """re-fed and enriched always; the other outcomes once there are some."""
    parts = [f"re-fed {replay.refed:,}", f"enriched {replay.outputs:,}"]
    others = (("dead letters", replay.dead_letters), ("dropped", replay.dropped))
    parts += [f"{name} {count:,}" for name, count in others if count]
    if replay.cancelled_events:
        parts.append(f"cancelled {replay.cancelled_events:,}")
    return " · ".join(parts)


def _title(replay: Replay) -> str:
    return f"{replay.id} {replay.state}" + (f" ({replay.note})" if replay.note else "")


class _Bar:
    """A rich progress bar on stderr: finished of selected, the counts, and the ETA."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task: TaskID | None = None

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def show(self, replay: Replay) -> None:
        description = replay.state + (f" ({replay.note})" if replay.note else "")
        fields: dict[str, Any] = {"description": description, "detail": _short(replay)}
        if self._task is None:
            self._task = self._progress.add_task(total=replay.selected, **fields)
        self._progress.update(
            self._task, total=replay.selected, completed=replay.finished, **fields
        )


class _Lines:
    """A progress line every few seconds (and at every change of state)."""

    def __init__(self, echo: Echo, clock: Callable[[], float] = time.monotonic) -> None:
        self._echo = echo
        self._clock = clock
        self._start: tuple[float, int] | None = None
        self._last: tuple[float, str] | None = None

    def __enter__(self) -> _Lines:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def show(self, replay: Replay) -> None:
        now = self._clock()
        if self._start is None:
            self._start = (now, replay.finished)
        due = self._last is None or now - self._last[0] >= LINE_EVERY
        if not due and self._last is not None and self._last[1] == replay.state:
            return
        self._last = (now, replay.state)
        line = (
            f"{_title(replay)}: {replay.finished:,}/{replay.selected:,} finished; {_detail(replay)}"
        )
        elapsed, done = now - self._start[0], replay.finished - self._start[1]
        if replay.active and done > 0 and elapsed > 0:
            left = max(0, replay.selected - replay.finished) * elapsed / done
            line += f"; about {human(left)} left"
        self._echo(line, err=True)


async def watch(config: Config, replay_id: str, *, live: bool, echo: Echo) -> Replay:
    """Show one replay's progress until it is done or cancelled; returns its last state."""
    redis = connect_redis(config)
    try:
        registry = ReplayRegistry(redis, config.app_id)
        with _Bar() if live else _Lines(echo) as display:
            while True:
                replay = await registry.get(replay_id)
                if replay is None:
                    raise EnricherError(f"replay {replay_id} is gone (expired?)")
                display.show(replay)
                if not replay.active:
                    return replay
                await asyncio.sleep(POLL)
    finally:
        await redis.aclose()


async def replay_status(config: Config, replay_id: str | None, *, as_json: bool) -> str:
    """One replay in detail (with its quota share used per API), or the recent ones."""
    redis = connect_redis(config)
    try:
        registry = ReplayRegistry(redis, config.app_id)
        if replay_id is None:
            replays = await registry.list()
            if as_json:
                return json.dumps({"replays": [r.as_dict() for r in replays]}, indent=2)
            return _table(replays)
        replay = await registry.get(check_id(replay_id))
        if replay is None:
            raise BadArgument("ID", f"no replay {replay_id} (unknown, or expired after 7 days)")
        quota = await _quota_shares(redis, config, replay_id)
        if as_json:
            return json.dumps({**replay.as_dict(), "quota_share": quota}, indent=2)
        return _details(replay, quota)
    finally:
        await redis.aclose()


async def _quota_shares(
    redis: aioredis.Redis, config: Config, replay_id: str
) -> dict[str, dict[str, dict[str, int | None]]]:
    used = dict.fromkeys(rule.api for rule in config.enrichments)
    shares = {}
    for api in used:
        usage = await replay_usage(redis, config.app_id, api, replay_id)
        if usage:
            shares[api] = {str(period): values for period, values in usage.items()}
    return shares


def _details(replay: Replay, quota: dict[str, dict[str, dict[str, int | None]]]) -> str:
    percent = f" ({100 * replay.finished / replay.selected:.0f}%)" if replay.selected else ""
    lines = [
        f"replay {replay.id} ({replay.kind}): {replay.state}",
        f"  window    [{replay.start.isoformat()}, {replay.end.isoformat()})",
        f"  share     {replay.share:g}",
        f"  created   {replay.created_at.isoformat()}",
        f"  selected  {replay.selected:,}, re-fed {replay.refed:,}, "
        f"finished {replay.finished:,}{percent}",
        f"  outcomes  outputs {replay.outputs:,}, dead letters {replay.dead_letters:,}, "
        f"dropped {replay.dropped:,}, cancelled {replay.cancelled_events:,}",
    ]
    if replay.note:
        lines.append(f"  note      {replay.note}")
    for api, periods in quota.items():
        for period, values in periods.items():
            cap = values.get("cap")
            of = f" of {cap:,}" if cap is not None else ""
            lines.append(f"  quota     {api} {period}: used {values.get('used') or 0:,}{of}")
    return "\n".join(lines)


def _table(replays: list[Replay]) -> str:
    if not replays:
        return "no replays in the last 7 days"
    rows = [("ID", "KIND", "STATE", "FINISHED", "SHARE", "CREATED")]
    for r in replays:
        finished = f"{r.finished:,}/{r.selected:,}"
        created = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
        rows.append((r.id, r.kind, r.state, finished, f"{r.share:g}", created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


async def cancel_replay(config: Config, replay_id: str) -> str:
    """Cancel a replay: workers stop calling APIs for it within a second."""
    redis = connect_redis(config)
    try:
        state = await ReplayRegistry(redis, config.app_id).cancel(check_id(replay_id))
    finally:
        await redis.aclose()
    if state is None:
        raise BadArgument("ID", f"no replay {replay_id} (unknown, or expired after 7 days)")
    if state == "cancelled":
        return f"replay {replay_id} cancelled: workers stop calling APIs for it"
    return f"replay {replay_id} is already {state}; nothing to cancel"
