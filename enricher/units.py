"""The human units of the config file: parse them, and write them back.

Durations (``250ms``, ``2s``, ``5m``, ``1h``, ``1d`` or a number of seconds), rates (``50/s``),
quotas (``100000/day``), backoff ranges (``100ms..10s``) and sizes (``1MiB``). Parsers raise
ValueError with a message meant for users; each ``format_*`` writes text that its parser reads back
to the very same value, so an effective config can be printed and loaded again.
"""

from __future__ import annotations

import math
import re
from typing import Final, Literal

__all__ = [
    "QuotaPeriod",
    "format_backoff",
    "format_duration",
    "format_quota",
    "format_rate",
    "format_size",
    "parse_backoff",
    "parse_duration",
    "parse_quota",
    "parse_rate",
    "parse_size",
]

QuotaPeriod = Literal["minute", "hour", "day", "month"]

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_DURATION_RE: Final = re.compile(rf"(?P<number>{_NUMBER})\s*(?P<unit>ms|s|m|h|d)?")
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE_RE: Final = re.compile(r"(?P<count>\d+)\s*/\s*(?P<per>\S.*)")
_RATE_UNITS: Final = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
}
_QUOTA_PERIODS: Final[dict[str, QuotaPeriod]] = {
    **dict.fromkeys(("minute", "min"), "minute"),
    **dict.fromkeys(("hour", "hr", "h"), "hour"),
    **dict.fromkeys(("day", "d"), "day"),
    **dict.fromkeys(("month", "mo"), "month"),
}
_SIZE_RE: Final = re.compile(r"(?P<number>\d+)\s*(?P<unit>[A-Za-z]*)")
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_FORMAT_SIZES: Final = (
    *(("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)),
    *(("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)),
)


def _show(value: object) -> str:
    """A short representation of a bad input for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"2s"``, ``"5m"``, ``"1h"``, ``"1d"`` or a number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        match = None
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
    else:
        return _non_negative(float(value), value)
    if match is None:
        raise ValueError(
            f"expected a duration like 250ms, 2s, 5m, 1h, 1d or a number of seconds, "
            f"got {_show(value)}"
        )
    number, unit = float(match["number"]), match["unit"] or "s"
    # Dividing keeps "100ms" exactly equal to 0.1 (0.001 * 100 would not always be).
    seconds = number / 1000 if unit == "ms" else number * _DURATION_UNITS[unit]
    return _non_negative(seconds, value)


def _non_negative(seconds: float, value: object) -> float:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number >= 0, got {_show(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact text for ``seconds``: ``"2s"``, ``"250ms"``, ``"1h"``, ``"0s"``."""
    if seconds >= 1e12 or round(seconds * 1000) / 1000 != seconds:
        return f"{float(seconds)!r}s"
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if millis % size == 0:
            return f"{millis // size}{unit}"
    return f"{millis}ms"


def parse_rate(value: object) -> tuple[int, float]:
    """``(count, per_seconds)`` from ``"50/s"``, ``"3000/m"``, ``"100/h"`` (or ``"1/30s"``)."""
    match = _RATE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    per: float | None = None
    if match is not None:
        unit = match["per"].strip()
        per = _RATE_UNITS.get(unit)
        if per is None and unit[:1].isdigit():
            per = parse_duration(unit) if _DURATION_RE.fullmatch(unit) else None
    if match is None or per is None:
        raise ValueError(f"expected N/s, N/m or N/h, got {_show(value)}")
    count = int(match["count"])
    if count <= 0 or per <= 0:
        raise ValueError(f"a rate must be positive, got {_show(value)}")
    return count, per


def format_rate(count: int, per: float) -> str:
    """``"50/s"``, ``"3000/m"``, ``"100/h"``; other periods as ``"1/30s"``."""
    unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(per)
    return f"{count}/{unit or format_duration(per)}"


def parse_quota(value: object) -> tuple[int, QuotaPeriod]:
    """``(limit, period)`` from ``"100000/day"``; periods: minute, hour, day, month."""
    match = _RATE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    period = _QUOTA_PERIODS.get(match["per"].strip()) if match else None
    if match is None or period is None:
        raise ValueError(f"expected N/minute, N/hour, N/day or N/month, got {_show(value)}")
    limit = int(match["count"])
    if limit <= 0:
        raise ValueError(f"a quota must be positive, got {_show(value)}")
    return limit, period


def format_quota(limit: int, period: QuotaPeriod) -> str:
    """``"100000/day"``."""
    return f"{limit}/{period}"


def parse_backoff(value: object) -> tuple[float, float]:
    """``(min, max)`` seconds from ``"100ms..10s"``; a single duration means min == max."""
    try:
        if isinstance(value, str) and ".." in value:
            low_text, _, high_text = value.partition("..")
            low, high = parse_duration(low_text), parse_duration(high_text)
        else:
            low = high = parse_duration(value)
    except ValueError:
        raise ValueError(f"expected MIN..MAX like 100ms..10s, got {_show(value)}") from None
    if low > high:
        raise ValueError(
            f"the backoff minimum {format_duration(low)} "
            f"exceeds the maximum {format_duration(high)}"
        )
    return low, high


def format_backoff(low: float, high: float) -> str:
    """``"100ms..10s"``."""
    return f"{format_duration(low)}..{format_duration(high)}"


def parse_size(value: object) -> int:
    """Bytes from ``"512KB"`` (1000s), ``"1MiB"`` (1024s), ``"100B"`` or a number of bytes."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        size: int | None = value
    else:
        match = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
        factor = _SIZE_UNITS.get(match["unit"].lower()) if match else None
        size = int(match["number"]) * factor if match and factor else None
    if size is None:
        raise ValueError(
            f"expected a size like 512KB, 1MiB or a number of bytes, got {_show(value)}"
        )
    if size < 0:
        raise ValueError(f"a size must be >= 0, got {_show(value)}")
    return size


def format_size(size: int) -> str:
    """``"1MiB"``, ``"512KB"``, ``"100B"``: the unit that writes ``size`` with the fewest digits."""
    exact = [(size // n, unit) for unit, n in _FORMAT_SIZES if size and size % n == 0]
    number, unit = min(exact, default=(size, "B"))
    return f"{number}{unit}"
