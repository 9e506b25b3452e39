"""Demo events for ``enricher produce --demo N`` and ``enricher dev``: realistic and seeded.

A small population of users browses, clicks and pays. Each user keeps one address (documentation
ranges, RFC 5737) and one browser, so the same ``client.ip`` comes back as it would in real
traffic. The mix, per event: about 55% ``page_view`` (with ``client.ip``: the geo rule), 25%
``click`` (no rule matches: passed through), 17% ``payment`` (``user_id`` and ``amount``: the
score rule) and 3% broken ``page_view`` without ``client`` (an ``invalid_event`` dead letter).
The same seed gives the same events; timestamps start at ``start`` and advance about 0.5 s each.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from .config import Config
from .kafka import ensure_topics, start_producer
from .produce import key_for
from .records import compact_json

__all__ = ["DEFAULT_START", "DemoEvents", "encode", "produce_events"]

DEFAULT_START = datetime(2024, 6, 3, 9, 0, tzinfo=UTC)
_KINDS = ("page_view", "click", "payment", "broken")
_WEIGHTS = (55, 25, 17, 3)
_NETWORKS = ("192.0.2", "198.51.100", "203.0.113")
_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15",
)
_PATHS = ("/", "/pricing", "/docs", "/blog/rate-limits", "/signup", "/checkout")
_REFERRERS = (None, None, "https://news.ycombinator.com/", "https://www.google.com/")
_ELEMENTS = ("buy-now", "signup", "nav-docs", "add-to-cart", "play-video")
_CURRENCIES = ("EUR", "USD", "GBP", "JPY")
_METHODS = ("card", "card", "paypal", "bank_transfer")


class DemoEvents:
    """An endless, deterministic stream of demo events: ``next(events)`` or ``events.take(n)``."""

    def __init__(self, seed: int = 0, *, users: int = 200, start: datetime = DEFAULT_START) -> None:
        self._random = random.Random(seed)
        self._users = [self._user(n) for n in range(users)]
        self._clock = start
        self._count = 0

    def _user(self, n: int) -> dict[str, str]:
        pick = self._random
        address = f"{pick.choice(_NETWORKS)}.{pick.randint(1, 254)}"
        return {"user_id": f"u-{1000 + n}", "ip": address, "agent": pick.choice(_AGENTS)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        pick = self._random
        self._count += 1
        self._clock += timedelta(milliseconds=pick.randint(50, 950))
        user = pick.choice(self._users)
        event: dict[str, Any] = {
            "type": "page_view",
            "event_id": f"evt-{self._count:06d}",
            "ts": self._clock.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "user_id": user["user_id"],
        }
        kind = pick.choices(_KINDS, _WEIGHTS)[0]
        if kind == "page_view":
            event["client"] = {"ip": user["ip"], "user_agent": user["agent"]}
            event["page"] = {"path": pick.choice(_PATHS), "referrer": pick.choice(_REFERRERS)}
        elif kind == "broken":  # a tracker bug: no client block, so no address to look up
            event["page"] = {"path": pick.choice(_PATHS), "referrer": None}
        elif kind == "click":
            event |= {"type": "click", "page": {"path": pick.choice(_PATHS)}}
            event["element"] = pick.choice(_ELEMENTS)
        else:
            event |= {"type": "payment", "order_id": f"ord-{pick.randint(10000, 99999)}"}
            event["amount"] = round(pick.lognormvariate(3.5, 1.0), 2)
            event |= {"currency": pick.choice(_CURRENCIES), "method": pick.choice(_METHODS)}
        return event

    def take(self, count: int) -> list[dict[str, Any]]:
        return [next(self) for _ in range(count)]


def encode(event: dict[str, Any]) -> bytes:
    return compact_json(event)


async def produce_events(
    config: Config, events: Iterable[dict[str, Any]], *, key_field: str | None = "user_id"
) -> int:
    """Publish ``events`` to the input topic (created if needed); returns how many were sent."""
    await ensure_topics(config, [config.topics.input])
    producer = await start_producer(config)
    try:
        pending = [
            await producer.send(config.topics.input, encode(event), key=key_for(event, key_field))
            for event in events
        ]
        for future in pending:
            await future
    finally:
        await producer.stop()
    return len(pending)
