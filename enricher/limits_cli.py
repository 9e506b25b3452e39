"""``enricher limits show|set|reset``: read and tune the limits all workers share in Redis."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from .config import ApiSettings, Config
from .errors import BadArgument
from .quota import ApiUsage, read_usage, reset_overrides, set_overrides
from .runtime import connect_redis
from .units import parse_quota, parse_rate

__all__ = ["format_usage", "reset_limits", "set_limits", "show_limits"]

T = TypeVar("T")


def _api(config: Config, name: str) -> ApiSettings:
    if name not in config.apis:
        known = ", ".join(sorted(config.apis)) or "none"
        raise BadArgument("API", f"unknown API '{name}' (configured: {known})")
    return config.apis[name]


async def show_limits(config: Config, *, as_json: bool = False) -> str:
    """Effective limits and current usage of every configured API."""
    redis = connect_redis(config)
    try:
        usages = [await read_usage(redis, config.app_id, api) for api in config.apis.values()]
    finally:
        await redis.aclose()
    if as_json:
        return json.dumps({"apis": [u.as_dict() for u in usages]}, indent=2)
    return "\n".join(format_usage(u, config.apis[u.api]) for u in usages) or "no APIs configured"


def format_usage(usage: ApiUsage, api: ApiSettings) -> str:
    """A few human-readable lines for one API; overridden values name the config value."""
    rate = f"{usage.rate:g}/s"
    if "rate" in usage.overrides:
        rate += f" (override; config {api.rate})"
    burst = str(usage.burst)
    if "burst" in usage.overrides:
        burst += f" (override; config {api.burst})"
    lines = [f"{usage.api}: rate {rate}, burst {burst}"]
    if usage.blocked_until is not None:
        lines.append(f"  blocked until {usage.blocked_until.isoformat()} (server Retry-After)")
    if (server := usage.server) is not None:
        lines.append(
            f"  server budget (its rate-limit headers): {max(0, server.left)} calls left until "
            f"{server.reset_at.isoformat()}, paced at {server.pace:.4g}/s"
        )
    if (shadow := usage.shadow) is not None:
        lines.append(
            f"  shadow rate {shadow.rate:g}/s, burst {shadow.burst} (not enforced): would have "
            f"delayed {shadow.delayed} of {shadow.calls} calls since set"
        )
    for quota in usage.quotas:
        lines.append(
            f"  quota {quota.limit}/{quota.period}: used {quota.used}, "
            f"remaining {quota.remaining}, resets {quota.resets_at.isoformat()}"
        )
    if not usage.quotas:
        lines.append("  no quotas")
    return "\n".join(lines)


async def set_limits(
    config: Config,
    api: str,
    *,
    rate: str | None = None,
    burst: int | None = None,
    quotas: Sequence[str] = (),
    shadow_rate: str | None = None,
    shadow_burst: int | None = None,
) -> None:
    """Store run-time overrides that every running worker applies at its next call; a shadow
    rate (and burst) is measured at every call but never enforced, and starts a new count."""
    _api(config, api)
    per_second = _per_second("--rate", rate)
    shadow_per_second = _per_second("--shadow-rate", shadow_rate)
    if shadow_burst is not None and shadow_rate is None:
        raise BadArgument("--shadow-burst", "needs --shadow-rate")
    if shadow_burst is not None and shadow_burst < 1:
        raise BadArgument("--shadow-burst", f"must be at least 1, got {shadow_burst}")
    quota_limits: dict[str, int | None] = {}
    for text in quotas:
        limit, period = _parsed("--quota", parse_quota, text)
        quota_limits[period] = limit
    if burst is not None and burst < 1:
        raise BadArgument("--burst", f"must be at least 1, got {burst}")
    redis = connect_redis(config)
    try:
        await set_overrides(
            redis,
            config.app_id,
            api,
            rate=per_second,
            burst=burst,
            quotas=quota_limits,
            shadow_rate=shadow_per_second,
            shadow_burst=shadow_burst,
        )
    finally:
        await redis.aclose()


def _per_second(option: str, rate: str | None) -> float | None:
    if rate is None:
        return None
    count, per = _parsed(option, parse_rate, rate)
    return count / per


def _parsed(option: str, parse: Callable[[str], T], text: str) -> T:
    try:
        return parse(text)
    except ValueError as exc:
        raise BadArgument(option, str(exc)) from None


async def reset_limits(config: Config, api: str, *, quota_usage: bool = False) -> None:
    """Drop an API's run-time overrides (and, optionally, this period's usage counters)."""
    _api(config, api)
    redis = connect_redis(config)
    try:
        await reset_overrides(redis, config.app_id, api, reset_usage=quota_usage)
    finally:
        await redis.aclose()
