"""``enricher replay`` and ``enricher dlq redrive``: select records, plan, re-feed, watch.

Both commands take a *source* of records to re-feed: the input events in a time window, or the
dead letters matching a filter. Without ``--yes`` the records are counted first and the user
confirms; then one pass writes them to the replay topic (bounded by the offsets the count saw,
so the count is exact), and the progress is watched until every re-fed event has an outcome.
Each phase runs in its own event loop so that Ctrl-C means what the user expects: before feeding,
nothing changed; while feeding, the replay is cancelled; while watching, we only detach.

Messages go to stderr; results (the replay id, the plan, the final tally) to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from .config import Config
from .dlq import LetterFilter, RedriveSelection, parse_kinds, parse_statuses
from .errors import BadArgument
from .quota import read_usage
from .redis_cache import RedisResponseCache
from .replay_feed import Feeding, Refeed, Source, feed
from .replay_plan import Planner, ReplayPlan
from .replay_scan import ScannedRecord, TopicScan, Window, parse_time, parse_window
from .replay_watch import watch
from .runtime import connect_redis

__all__ = [
    "RunOptions",
    "default_share",
    "input_source",
    "redrive_main",
    "redrive_source",
    "replay_main",
    "run",
]

Echo = Callable[..., None]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """``interactive``: stdin is a terminal (we may ask); ``live``: a progress bar on stderr."""

    share: float | None = None
    dry_run: bool = False
    yes: bool = False
    detach: bool = False
    as_json: bool = False
    interactive: bool = False
    live: bool = False


def input_source(config: Config, window: Window) -> Source:
    """The input events with Kafka timestamps in ``window``."""
    what = f"events of '{config.topics.input}' with timestamps in {window}"
    return Source("replay", config.topics.input, window, window, _as_is, what)


def _as_is(batch: list[ScannedRecord]) -> list[Refeed]:
    return [Refeed.of(record) for record in batch]


def redrive_source(config: Config, letters: LetterFilter) -> Source:
    """The dead letters matching ``letters``."""
    selection = RedriveSelection(letters)
    since = f" written since {letters.since.isoformat()}" if letters.since else ""
    what = f"dead letters of '{config.topics.dead_letter}'{since}"
    window = letters.window
    return Source("redrive", config.topics.dead_letter, window, window, selection.refeeds, what)


def default_share(config: Config) -> float:
    """The lowest ``replay_share`` of the APIs the rules use (all APIs if no rule; 1 if none):
    one replay has one share, and it must respect every API's."""
    used = {rule.api for rule in config.enrichments} or set(config.apis)
    return min((config.apis[name].replay_share for name in used), default=1.0)


def replay_main(
    config: Config,
    start: str,
    end: str | None,
    options: RunOptions,
    *,
    echo: Echo,
    confirm: Callable[[str], bool],
) -> int:
    """``enricher replay --from START [--to END]``; returns the exit code."""
    window = parse_window(start, end)
    return run(config, lambda: input_source(config, window), options, echo=echo, confirm=confirm)


def redrive_main(
    config: Config,
    kinds: Sequence[str],
    statuses: Sequence[str],
    since: str | None,
    options: RunOptions,
    *,
    echo: Echo,
    confirm: Callable[[str], bool],
) -> int:
    """``enricher dlq redrive [--kind K] [--status S] [--since T]``; returns the exit code."""
    now = datetime.now(UTC)
    letters = LetterFilter(
        parse_kinds(kinds),
        parse_statuses(statuses),
        parse_time(since, now=now, option="--since") if since else None,
    )
    return run(config, lambda: redrive_source(config, letters), options, echo=echo, confirm=confirm)


def run(
    config: Config,
    source: Callable[[], Source],
    options: RunOptions,
    *,
    echo: Echo,
    confirm: Callable[[str], bool],
) -> int:
    """Run the command; returns the exit code. ``source`` makes a fresh source per pass."""
    share = options.share if options.share is not None else default_share(config)
    if not (options.dry_run or options.yes or options.interactive):
        raise BadArgument(
            "--yes", "stdin is not a terminal, so nothing can be confirmed: pass --yes"
        )
    if options.dry_run:
        plan = asyncio.run(_dry_run(config, source(), share))
        echo(json.dumps(plan.as_dict(), indent=2) if options.as_json else plan.render())
        return 0
    selected, stops = 0, None
    if not options.yes:
        first = source()
        selected, stops = asyncio.run(_count(config, first))
        if not selected:
            echo(f"nothing to re-feed: no {first.what}", err=True)
            return 0
        echo(f"{selected:,} {first.what}", err=True)
        echo(f"will be re-fed to '{config.topics.replay}' at share {share:g}", err=True)
        if not confirm("Start?"):
            echo("not started; nothing changed", err=True)
            return 1
    return _feed_and_watch(config, source(), share, selected, stops, options, echo)


def _feed_and_watch(
    config: Config,
    source: Source,
    share: float,
    selected: int,
    stops: dict[int, int] | None,
    options: RunOptions,
    echo: Echo,
) -> int:
    feeding = Feeding()
    try:
        replay = asyncio.run(feed(config, source, share, selected, stops, feeding))
    except KeyboardInterrupt:
        if feeding.replay_id is None:
            echo("interrupted; nothing changed", err=True)
        else:
            echo(
                f"interrupted: replay {feeding.replay_id} cancelled after {feeding.refed:,}",
                err=True,
            )
        return 130
    hint = f"`enricher replay status {replay.id}`, `enricher replay cancel {replay.id}`"
    echo(f"replay {replay.id}: {replay.refed:,} {source.what} re-fed at share {share:g}", err=True)
    if options.detach or not replay.active:
        echo(f"see {hint}" if replay.active else f"replay {replay.id} is {replay.state}", err=True)
        echo(replay.id)
        return 0
    echo(replay.id)
    try:
        final = asyncio.run(watch(config, replay.id, live=options.live, echo=echo))
    except KeyboardInterrupt:
        echo(f"detached: replay {replay.id} goes on; {hint}", err=True)
        return 0
    tally = ", ".join(f"{name.replace('_', ' ')} {getattr(final, name):,}" for name in _TALLY)
    echo(f"replay {final.id} {final.state}: {tally}" + (f" ({final.note})" if final.note else ""))
    return 0 if final.state == "done" else 1


_TALLY = ("selected", "outputs", "dead_letters", "dropped", "cancelled_events")


async def _count(config: Config, source: Source) -> tuple[int, dict[int, int]]:
    """How many records the source selects, and where each partition's scan stopped."""
    scan = TopicScan(config, source.topic, source.scan_window)
    count = 0
    async with contextlib.aclosing(scan.batches()) as batches:
        async for batch in batches:
            count += len(source.refeeds(batch))
    return count, scan.stats.stops


async def _dry_run(config: Config, source: Source, share: float) -> ReplayPlan:
    planner = Planner(config)
    scan = TopicScan(config, source.topic, source.scan_window)
    async with contextlib.aclosing(scan.batches()) as batches:
        async for batch in batches:
            planner.add_all(refeed.value for refeed in source.refeeds(batch))
    redis = connect_redis(config)
    try:
        cache = RedisResponseCache(redis=redis, app_id=config.app_id)
        used = dict.fromkeys(rule.api for rule in config.enrichments)
        usages = {name: await read_usage(redis, config.app_id, config.apis[name]) for name in used}
        return await planner.estimate(share=share, contains=cache.contains, usages=usages)
    finally:
        await redis.aclose()
