"""The enrichment use case: one input record in, one outcome out (no Kafka, no Faust here)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .config import Config
from .errors import CallError, EventError, InvalidEvent
from .lanes import Lane
from .rules import MISSING, CompiledRule

__all__ = ["ApiClient", "DeadLetter", "Dropped", "Enriched", "Enricher", "Outcome", "decode_event"]


class ApiClient(Protocol):
    """What the enricher needs from the HTTP caller."""

    def call(self, api: str, params: Mapping[str, Any], lane: Lane | None = None) -> Awaitable[Any]:
        """The call to await (it may raise an EventError at once, or when awaited)."""


@dataclass(frozen=True, slots=True)
class Enriched:
    """The input object with its ``enrichment`` key: goes to the output topic."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event that could not be enriched: goes to the dead-letter topic with the reason."""

    event: dict[str, Any] | str
    error: EventError


@dataclass(frozen=True, slots=True)
class Dropped:
    """An event no rule matched, with ``unmatched: drop``."""


Outcome = Enriched | DeadLetter | Dropped


def decode_event(raw: bytes | None, *, max_bytes: int) -> dict[str, Any]:
    """Parse one input record value into a JSON object, or raise InvalidEvent saying why."""
    if raw is None:
        raise InvalidEvent("record has no value (tombstone)")
    if len(raw) > max_bytes:
        raise InvalidEvent(f"record is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        value = json.loads(raw.decode("utf-8"))  # bytes would also accept UTF-16/32
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"record is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"record is not valid JSON: {exc.msg} at char {exc.pos}") from None
    except RecursionError:
        raise InvalidEvent("record JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidEvent(f"record is JSON {type(value).__name__}, not an object")
    return value


def raw_text(raw: bytes | None, *, max_chars: int) -> str:
    """The raw record as text for a dead letter (bad bytes replaced, cut at ``max_chars``)."""
    if raw is None:
        return ""
    return raw[:max_chars].decode("utf-8", errors="replace")


class Enricher:
    """Applies the config's rules to events, calling APIs through an :class:`ApiClient`."""

    def __init__(self, config: Config, client: ApiClient) -> None:
        self._client = client
        self._rules = tuple(CompiledRule(rule) for rule in config.enrichments)
        self._unmatched = config.unmatched
        self._max_event_bytes = config.worker.max_event_bytes

    async def enrich(self, raw: bytes | None, lane: Lane | None = None) -> Outcome:
        """Decode, match and enrich one record value (calls in ``lane``: live when None).

        Never raises an EventError: it becomes a DeadLetter. (ShuttingDown and cancellation do
        propagate: the event stays unfinished.)"""
        try:
            event = decode_event(raw, max_bytes=self._max_event_bytes)
        except InvalidEvent as exc:
            return DeadLetter(raw_text(raw, max_chars=self._max_event_bytes), exc)
        rules = [rule for rule in self._rules if rule.matches(event)]
        if not rules:
            return self._unmatched_outcome(event)
        try:
            if len(rules) == 1:  # most events: one call, awaited here (one frame less per wait)
                rule = rules[0]
                body = await self._client.call(rule.api, rule.request_params(event), lane)
                results = {rule.into: self._pick(rule, body)}
            else:
                results = await self._call_all(event, rules, lane)
        except EventError as exc:
            return DeadLetter(event, exc)
        event["enrichment"] = results
        return Enriched(event)

    def _unmatched_outcome(self, event: dict[str, Any]) -> Outcome:
        if self._unmatched == "drop":
            return Dropped()
        if self._unmatched == "dead_letter":
            return DeadLetter(event, InvalidEvent("no enrichment rule matches this event"))
        event["enrichment"] = {}
        return Enriched(event)

    async def _call_all(
        self, event: Mapping[str, Any], rules: Iterable[CompiledRule], lane: Lane | None
    ) -> dict[str, Any]:
        """Call every matched rule's API at once; the first failure fails the event."""
        requests = [(rule, rule.request_params(event)) for rule in rules]
        tasks: list[asyncio.Future[Any]] = []
        try:
            for rule, params in requests:  # a call may fail at once: the others are cancelled
                tasks.append(asyncio.ensure_future(self._client.call(rule.api, params, lane)))
            bodies = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failure fails the event: stop spending on the others
                task.cancel()
            raise
        pairs = zip(requests, bodies, strict=True)
        return {rule.into: self._pick(rule, body) for (rule, _), body in pairs}

    @staticmethod
    def _pick(rule: CompiledRule, body: Any) -> Any:
        picked = rule.pick(body)
        if picked is MISSING:
            raise CallError(
                "bad_response", f"response has no '{rule.select}'", api=rule.api, attempts=1
            )
        return picked
