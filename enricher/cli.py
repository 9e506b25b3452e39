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

F = TypeVar("F", bound=Callable[..., Any])

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
@handle_errors
def worker(config_path: str | None, web_port: int | None, loglevel: str) -> None:
    """Run one worker in the foreground until SIGINT/SIGTERM."""
    from .worker import run_worker

    run_worker(load(config_path), web_port=web_port, loglevel=loglevel)


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
@click.argument("source", type=click.File("rb"), default="-")
@handle_errors
def produce(config_path: str | None, key_field: str | None, source: Any) -> None:
    """Publish JSON lines (FILE or - for stdin) to the input topic."""
    from .produce import produce_lines

    sent, skipped = asyncio.run(produce_lines(load(config_path), source, key_field=key_field))
    click.echo(f"produced {sent} event(s), skipped {skipped} invalid line(s)", err=True)


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
@handle_errors
def limits_set(
    config_path: str | None, api: str, rate: str | None, burst: int | None, quotas: tuple[str, ...]
) -> None:
    """Override API's limits at run time for all running workers (applied within 2 s)."""
    from .limits_cli import set_limits

    if rate is None and burst is None and not quotas:
        raise click.UsageError("give at least one of --rate, --burst, --quota")
    asyncio.run(set_limits(load(config_path), api, rate=rate, burst=burst, quotas=quotas))
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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="enricher")
