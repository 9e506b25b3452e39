"""An API's own rate-limit headers, read into one figure: calls left, and until when.

Read (header names are case-insensitive)::

    X-RateLimit-Limit / -Remaining / -Reset   also X-Rate-Limit-*, and the IETF drafts' early
                                              separate RateLimit-Limit / -Remaining / -Reset
        Reset: delta seconds, or an epoch time when too large to be a delta (>= 1e9: seconds,
        >= 1e11: milliseconds). X-RateLimit-Reset-After (delta seconds) wins over Reset.
    RateLimit: limit=100, remaining=50, reset=30          IETF draft, dictionary form
    RateLimit: "default";r=50;t=30, "day";r=900;t=3600    IETF draft, current list form
    RateLimit-Policy: "default";q=100;w=60                a policy's window w stands in for a
                                                          missing t, its quota q is the limit

When several are given (or one lists several policies), the most restrictive wins: the fewest
calls left per second until its reset. A value that cannot be read is ignored, never an error: the
signal is advice, and the answer it came with is already in hand. ``Retry-After`` is read by
:func:`enricher.retry.parse_retry_after`, not here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

__all__ = ["MAX_RESET", "RateSignal", "read_signal"]

MAX_RESET = 31 * 86_400.0  # seconds: a monthly window at most; anything longer is capped
_EPOCH_SECONDS, _EPOCH_MILLIS = 1e9, 1e11  # a "reset" this large is a time, not a delta
_PREFIXES = ("x-ratelimit-", "x-rate-limit-", "ratelimit-")
_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?)")


@dataclass(frozen=True, slots=True)
class RateSignal:
    """The server says ``remaining`` calls are left for ``reset`` seconds (out of ``limit``)."""

    remaining: int
    reset: float
    limit: int | None = None

    @property
    def pace(self) -> float:
        """Calls per second that spend what is left exactly by the reset."""
        return self.remaining / self.reset


def read_signal(headers: Mapping[str, str], *, now: datetime) -> RateSignal | None:
    """The most restrictive signal in ``headers`` (an aiohttp ``CIMultiDictProxy`` or any
    mapping; names are matched case-insensitively), or None. ``now`` turns epoch resets into
    seconds."""
    # Every field read below has "rate" in its name; most answers have none of them.
    fields = {name.lower(): value for name, value in headers.items() if "rate" in name.lower()}
    if not fields:
        return None
    epoch = now.timestamp()
    found = [*_prefixed(fields, epoch), *_structured(fields)]
    usable = [s for s in found if s is not None]
    return min(usable, key=lambda s: s.pace, default=None)


def _prefixed(fields: Mapping[str, str], epoch: float) -> Iterator[RateSignal | None]:
    """One signal per ``X-RateLimit-*``-style family of separate fields."""
    for prefix in _PREFIXES:
        remaining = _number(fields.get(prefix + "remaining"))
        after = _number(fields.get(prefix + "reset-after"))
        reset = after if after is not None else _number(fields.get(prefix + "reset"))
        if after is None and reset is not None:
            reset = _as_delta(reset, epoch)
        limit = _number(fields.get(prefix + "limit"))
        yield _signal(remaining, reset, limit)


def _structured(fields: Mapping[str, str]) -> Iterator[RateSignal | None]:
    """Signals of the IETF ``RateLimit`` field, with ``RateLimit-Policy`` filling gaps."""
    text = fields.get("ratelimit")
    if not text:
        return
    policies = dict(_policies(fields.get("ratelimit-policy", "")))
    members = [_parts(member) for member in _split(text, ",")]
    dictionary = {key: value for key, value, _ in members if value is not None}
    if dictionary:  # limit=100, remaining=50, reset=30
        limit = _number(dictionary.get("limit"))
        yield _signal(_number(dictionary.get("remaining")), _number(dictionary.get("reset")), limit)
        return
    for name, _, params in members:  # "default";r=50;t=30
        quota, window = policies.get(name, (None, None))
        reset = _number(params.get("t"))
        yield _signal(_number(params.get("r")), reset if reset is not None else window, quota)


def _policies(text: str) -> Iterator[tuple[str, tuple[float | None, float | None]]]:
    """``RateLimit-Policy`` as name -> (quota, window); an unnamed ``100;w=60`` is named by
    its number too, and also stands as the default policy (``""``)."""
    for key, value, params in (_parts(member) for member in _split(text, ",")):
        quota = _number(params.get("q")) if value is None else _number(value)
        if value is None and quota is None:
            quota = _number(key)
        figures = (quota, _number(params.get("w")))
        yield key, figures
        if _number(key) is not None:
            yield "", figures


def _parts(member: str) -> tuple[str, str | None, dict[str, str]]:
    """A structured-field member as (key or bare item, its ``=value`` if any, parameters)."""
    head, *rest = [part.strip() for part in _split(member, ";")] or [""]
    key, equals, value = head.partition("=")
    params = {}
    for part in rest:
        name, _, param = part.partition("=")
        params[name.strip().lower()] = param.strip()
    return _unquote(key.strip()).lower(), _unquote(value.strip()) if equals else None, params


def _split(text: str, separator: str) -> list[str]:
    """``text`` split on ``separator`` outside double quotes; empty members dropped."""
    parts, start, quoted = [], 0, False
    for index, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part for part in parts if part.strip()]


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _number(value: str | None) -> float | None:
    """The leading number of ``value`` (of its first comma-separated element), or None."""
    if value is None:
        return None
    match = _NUMBER.match(value)
    if match is None:
        return None
    number = float(match.group(1))
    return number if math.isfinite(number) else None


def _as_delta(reset: float, epoch: float) -> float:
    """A ``Reset`` value as seconds from now: large values are epoch seconds or milliseconds."""
    if reset >= _EPOCH_MILLIS:
        return reset / 1000 - epoch
    if reset >= _EPOCH_SECONDS:
        return reset - epoch
    return reset


def _signal(remaining: float | None, reset: float | None, limit: float | None) -> RateSignal | None:
    if remaining is None or reset is None or not reset > 0:
        return None
    whole_limit = int(limit) if limit is not None and limit >= 0 else None
    return RateSignal(max(0, math.floor(remaining)), min(reset, MAX_RESET), whole_limit)
