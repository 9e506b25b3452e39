"""The ``enricher`` command line: parses arguments and delegates (contract section 1).

Exit codes: 0 success; 2 bad usage or invalid config (the message names the key); 1 a runtime
failure such as an unreachable service, with a one-line reason on stderr.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .config import Config, load_config_or_default_path, render_effective
from .errors import BadArgument, ConfigError, EnricherError
from .units import parse_backoff, parse_duration, parse_rate

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

CONFIG_HELP = "Config file (default: $ENRICHER_CONFIG, else ./enricher.yaml)."


def _fail(code: int, message: str) -> None:
    click.echo(f"enricher: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Turn enricher errors into the contract's exit codes and one-line messages."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BadArgument as exc:
            _fail(2, str(exc))
        except ConfigError as exc:
            _fail(2, f"invalid config: {exc}")
        except EnricherError as exc:
            _fail(1, str(exc))
        except OSError as exc:
            _fail(1, f"{type(exc).__name__}: {exc.strerror or exc}")

    return wrapper  # type: ignore[return-value]


def config_option(func: F) -> F:
    return click.option("--config", "config_path", metavar="PATH", help=CONFIG_HELP)(func)


def load(config_path: str | None) -> Config:
    return load_config_or_default_path(config_path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="enricher")
def cli() -> None:
    """Enrich a Kafka event stream with third-party HTTP APIs, within their limits and quotas."""


@cli.command()
@config_option
@click.option(
    "--web-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port of the worker's HTTP server (0 or omitted: a free port).",
)
@click.option(
    "--loglevel",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per log line (time, level, logger, message, extra fields).",
)
@handle_errors
def worker(config_path: str | None, web_port: int | None, loglevel: str, log_format: str) -> None:
    """Run one worker in the foreground until SIGINT/SIGTERM."""
    from .worker import run_worker

    fmt: Any = log_format
    run_worker(load(config_path), web_port=web_port, loglevel=loglevel, log_format=fmt)


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@handle_errors
def status(config_path: str | None, as_json: bool) -> None:
    """Workers alive, lag per partition, in-flight calls, calls/s, errors and limiter waits per
    API, quota burn, cache hit ratio, replays in progress."""
    from .status import show_status

    click.echo(asyncio.run(show_status(load(config_path), as_json=as_json)))


@cli.command("check-config")
@click.argument("path", required=False)
@config_option
@handle_errors
def check_config(path: str | None, config_path: str | None) -> None:
    """Validate a config file and print the effective config (secrets masked)."""
    config = load(path or config_path)
    click.echo(render_effective(config), nl=False)


@cli.command()
@config_option
@click.option("--key-field", metavar="PATH", help="Dotted path of the field to use as the key.")
@click.option(
    "--demo",
    type=click.IntRange(min=1),
    metavar="N",
    help="Send N generated demo events (page views, clicks, payments) instead of reading "
    "JSON lines; keyed by user_id unless --key-field is given.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --demo events.")
@click.argument("source", type=click.File("rb"), required=False)
@handle_errors
def produce(
    config_path: str | None, key_field: str | None, demo: int | None, seed: int, source: Any
) -> None:
    """Publish JSON lines (FILE or - for stdin) to the input topic."""
    if demo is not None and source is not None:
        raise click.UsageError("give either --demo N or a FILE, not both")
    config = load(config_path)
    if demo is not None:
        from .demo import DemoEvents, produce_events

        events = DemoEvents(seed).take(demo)
        sent = asyncio.run(produce_events(config, events, key_field=key_field or "user_id"))
        click.echo(f"produced {sent} demo event(s)", err=True)
        return
    from .produce import produce_lines

    source = source or click.get_binary_stream("stdin")
    sent, skipped = asyncio.run(produce_lines(config, source, key_field=key_field))
    click.echo(f"produced {sent} event(s), skipped {skipped} invalid line(s)", err=True)


def _parsed(option: str, parse: Callable[[str], T], value: str) -> T:
    """``parse(value)``; a ValueError becomes a BadArgument naming ``option`` (exit 2)."""
    try:
        return parse(value)
    except ValueError as exc:
        raise BadArgument(option, str(exc)) from None


def _per_second(text: str) -> float:
    """Calls per second from ``50``, ``12.5``, ``50/s`` or ``3000/m``."""
    try:
        if "/" in text:
            count, per = parse_rate(text)
            number = count / per
        else:
            number = float(text)
    except ValueError:
        raise ValueError(f"expected calls per second (50) or N/s, N/m, N/h, got {text!r}") from None
    if not 0 < number < float("inf"):
        raise ValueError(f"a rate must be a positive number, got {text!r}")
    return number


def _latency(text: str) -> float | tuple[float, float]:
    """Seconds from ``50ms``, or a ``(min, max)`` range from ``20ms..200ms``."""
    try:
        low, high = parse_backoff(text)
    except ValueError:
        raise ValueError(
            f"expected a duration (50ms) or a range MIN..MAX (20ms..200ms) with "
            f"MIN <= MAX, got {text!r}"
        ) from None
    return (low, high) if ".." in text else low


@cli.command("sandbox-api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8081,
    show_default=True,
    help="Port to listen on (0: a free port, printed).",
)
@click.option(
    "--rate", metavar="R", help="Its own limit: calls/s (50), or N/s, N/m. Default: none."
)
@click.option(
    "--burst",
    type=click.IntRange(min=1),
    metavar="N",
    help="Bucket size (default: one second's worth).",
)
@click.option("--latency", metavar="D", help="Delay per answer: 50ms, or a range 20ms..200ms.")
@click.option(
    "--error-rate",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Share of calls answered 500/502/503.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of latency and faults.")
@handle_errors
def sandbox_api(
    host: str,
    port: int,
    rate: str | None,
    burst: int | None,
    latency: str | None,
    error_rate: float,
    seed: int,
) -> None:
    """A local stand-in for a rate-limited third-party API (GET /stats shows what it saw)."""
    from .sandbox import SandboxSettings, serve_sandbox
    from .services import find_free_port

    settings = SandboxSettings(
        rate=_parsed("--rate", _per_second, rate) if rate is not None else None,
        burst=burst,
        latency=_parsed("--latency", _latency, latency) if latency is not None else 0.0,
        error_rate=error_rate,
        seed=seed,
    )
    port = port or find_free_port(host)
    limit = f"{settings.rate:g}/s, burst {settings.effective_burst}" if settings.rate else "none"
    click.echo(f"sandbox API on http://{host}:{port} (limit: {limit}); Ctrl-C stops it")
    serve_sandbox(settings, host=host, port=port)


@cli.command()
@config_option
@click.option("--host", metavar="H", help="Address to listen on (default: ingest.host).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port to listen on (default: ingest.port; 0: a free port, printed).",
)
@handle_errors
def ingest(config_path: str | None, host: str | None, port: int | None) -> None:
    """Take batches of events over HTTP (POST /events), check each against its own schema and
    publish the valid ones; runs until SIGINT/SIGTERM."""
    import os
    from pathlib import Path

    from .ingest_web import serve_ingest

    path = Path(config_path or os.environ.get("ENRICHER_CONFIG") or "./enricher.yaml")
    config = load(str(path))
    base_dir = path.resolve().parent  # ingest.schemas and api_keys_file are relative to it
    asyncio.run(serve_ingest(config, base_dir=base_dir, host=host, port=port, announce=click.echo))


@cli.command()
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="Config to run (default: examples/enricher.yaml); its broker, Redis and API addresses "
    "are replaced by the embedded services'.",
)
@click.option(
    "--duration",
    metavar="D",
    help="Stop after D (30s, 5m) with a summary; exit 0 only if events were enriched within "
    "every limit. Default: run until Ctrl-C.",
)
@click.option("--no-tty", is_flag=True, help="Progress lines every 5 s instead of a live view.")
@click.option(
    "--workers",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Worker processes (one consumer group, sharing every limit).",
)
@click.option(
    "--events-per-second",
    type=click.FloatRange(min=0, min_open=True, max=10_000),
    default=100.0,
    show_default=True,
    help="Pace of the demo producer.",
)
@handle_errors
def dev(
    config_path: str | None,
    duration: str | None,
    no_tty: bool,
    workers: int,
    events_per_second: float,
) -> None:
    """The whole stack on this machine (broker, Redis, sandbox API, workers, demo producer),
    shown live; Ctrl-C stops everything it started."""
    from pathlib import Path

    from .dev import DevOptions, default_config_path, run_dev

    seconds = _parsed("--duration", parse_duration, duration) if duration else None
    path = Path(config_path) if config_path else default_config_path()
    options = DevOptions(path, workers=workers, events_per_second=events_per_second)
    live = not no_tty and sys.stdout.isatty()
    sys.exit(asyncio.run(run_dev(options, duration=seconds, live=live)))


@cli.group()
def limits() -> None:
    """Show and tune each API's rate limit and quotas (shared by all workers)."""


@limits.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def limits_show(config_path: str | None, as_json: bool) -> None:
    """Effective rate, burst and quotas per API, with current usage."""
    from .limits_cli import show_limits

    click.echo(asyncio.run(show_limits(load(config_path), as_json=as_json)))


@limits.command("set")
@config_option
@click.argument("api")
@click.option(
    "--rate", metavar="N/s", help="Token-bucket refill, as in the config (N/s, N/m, N/h)."
)
@click.option("--burst", type=int, metavar="N", help="Bucket size.")
@click.option(
    "--quota",
    "quotas",
    multiple=True,
    metavar="N/PERIOD",
    help="A quota such as 5000/day (repeatable; one per period).",
)
@click.option(
    "--shadow-rate",
    metavar="N/s",
    help="Try a limit without enforcing it: count the calls it would have delayed.",
)
@click.option(
    "--shadow-burst", type=int, metavar="N", help="The shadow limit's bucket size (default: 1 s)."
)
@handle_errors
def limits_set(
    config_path: str | None,
    api: str,
    rate: str | None,
    burst: int | None,
    quotas: tuple[str, ...],
    shadow_rate: str | None,
    shadow_burst: int | None,
) -> None:
    """Override API's limits at run time for all running workers (applied within 2 s)."""
    from .limits_cli import set_limits

    if rate is None and burst is None and not quotas and shadow_rate is None:
        raise click.UsageError("give at least one of --rate, --burst, --quota, --shadow-rate")
    asyncio.run(
        set_limits(
            load(config_path),
            api,
            rate=rate,
            burst=burst,
            quotas=quotas,
            shadow_rate=shadow_rate,
            shadow_burst=shadow_burst,
        )
    )
    click.echo(f"limits of {api} overridden; running workers apply them at their next call")


@limits.command("reset")
@config_option
@click.argument("api")
@click.option("--quota-usage", is_flag=True, help="Also drop the current periods' usage counters.")
@handle_errors
def limits_reset(config_path: str | None, api: str, quota_usage: bool) -> None:
    """Drop API's run-time overrides (back to the config file's limits)."""
    from .limits_cli import reset_limits

    asyncio.run(reset_limits(load(config_path), api, quota_usage=quota_usage))
    click.echo(f"overrides of {api} dropped" + (", quota usage reset" if quota_usage else ""))


_TIME = "ISO-8601 (no zone = UTC) or relative: -2h, -30m, -1d, now."
_SHARE = click.FloatRange(0, 1, min_open=True)
_SHARE_HELP = (
    "Share (0<X<=1) of each API's rate and remaining quota the replay may use "
    "(default: the lowest replay_share of the APIs the rules use)."
)


def _run_options(share: float | None, dry_run: bool, yes: bool, detach: bool, as_json: bool) -> Any:
    from .replay_cli import RunOptions

    interactive, live = sys.stdin.isatty(), sys.stderr.isatty()
    return RunOptions(share, dry_run, yes, detach, as_json, interactive=interactive, live=live)


def _confirm(question: str) -> bool:
    return click.confirm(question, default=False, err=True)


def _replay_options(func: F) -> F:
    for option in reversed(
        (
            click.option("--share", type=_SHARE, metavar="X", help=_SHARE_HELP),
            click.option("--dry-run", is_flag=True, help="Only estimate; change nothing."),
            click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
            click.option("--detach", is_flag=True, help="Return once re-fed; print the id."),
            click.option("--json", "as_json", is_flag=True, help="--dry-run: print JSON."),
        )
    ):
        func = option(func)
    return func


@cli.group(invoke_without_command=True, subcommand_metavar="[COMMAND [ARGS]...]")
@config_option
@click.option("--from", "start", metavar="T", help="Window start (inclusive): " + _TIME)
@click.option("--to", "end", metavar="T", help="Window end (exclusive, default now): " + _TIME)
@_replay_options
@click.pass_context
@handle_errors
def replay(
    ctx: click.Context,
    config_path: str | None,
    start: str | None,
    end: str | None,
    share: float | None,
    dry_run: bool,
    yes: bool,
    detach: bool,
    as_json: bool,
) -> None:
    """Re-process the input events with Kafka timestamps in [--from, --to) while live traffic
    keeps flowing; or see (status) and stop (cancel) replays."""
    if ctx.invoked_subcommand is not None:
        if start or end or share is not None or dry_run or yes or detach or as_json:
            raise click.UsageError(f"replay {ctx.invoked_subcommand} takes none of those options")
        return
    if start is None:
        raise click.UsageError("Missing option '--from'.")
    from .replay_cli import replay_main

    options = _run_options(share, dry_run, yes, detach, as_json)
    code = replay_main(load(config_path), start, end, options, echo=click.echo, confirm=_confirm)
    sys.exit(code)


def _group_config(ctx: click.Context, config_path: str | None) -> Config:
    """``replay --config F status`` or ``replay status --config F``."""
    parent = ctx.parent.params.get("config_path") if ctx.parent is not None else None
    return load(config_path or parent)


@replay.command("status")
@config_option
@click.argument("replay_id", metavar="[ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def replay_status(
    ctx: click.Context, config_path: str | None, replay_id: str | None, as_json: bool
) -> None:
    """One replay in detail, or the recent ones (last 7 days)."""
    from .replay_watch import replay_status as status

    config = _group_config(ctx, config_path)
    click.echo(asyncio.run(status(config, replay_id, as_json=as_json)))


@replay.command("cancel")
@config_option
@click.argument("replay_id", metavar="ID")
@click.pass_context
@handle_errors
def replay_cancel(ctx: click.Context, config_path: str | None, replay_id: str) -> None:
    """Cancel a replay: workers stop calling APIs for it at once."""
    from .replay_watch import cancel_replay

    click.echo(asyncio.run(cancel_replay(_group_config(ctx, config_path), replay_id)))


@cli.group()
def dlq() -> None:
    """Dead letters."""


@dlq.command("redrive")
@config_option
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    metavar="K",
    help="Error kind: invalid_event, http_status, timeout, connection, bad_response (repeatable).",
)
@click.option(
    "--status", "statuses", multiple=True, metavar="S", help="HTTP status: 503 or 5xx (repeatable)."
)
@click.option("--since", metavar="T", help="Dead letters written at or after T: " + _TIME)
@_replay_options
@handle_errors
def dlq_redrive(
    config_path: str | None,
    kinds: tuple[str, ...],
    statuses: tuple[str, ...],
    since: str | None,
    share: float | None,
    dry_run: bool,
    yes: bool,
    detach: bool,
    as_json: bool,
) -> None:
    """Send matching dead letters back through the replay lane (a replay of kind redrive)."""
    from .replay_cli import redrive_main

    options = _run_options(share, dry_run, yes, detach, as_json)
    config = load(config_path)
    code = redrive_main(config, kinds, statuses, since, options, echo=click.echo, confirm=_confirm)
    sys.exit(code)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="enricher")
