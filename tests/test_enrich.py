"""The enrichment use case: decoding, rule matching, params, select, unmatched policies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from enricher.config import config_from_dict
from enricher.enrich import DeadLetter, Dropped, Enriched, Enricher, decode_event
from enricher.errors import CallError, InvalidEvent
from enricher.rules import MISSING, get_path

APIS = {
    "geo": {"url": "http://127.0.0.1:1/geo/{ip}", "rate": "10/s"},
    "score": {"url": "http://127.0.0.1:1/score", "method": "POST", "rate": "10/s"},
}


class FakeClient:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail
        self.cancelled = 0

    async def call(self, api: str, params: Mapping[str, Any], lane: Any = None) -> Any:
        self.calls.append((api, dict(params)))
        if api == self.fail:
            raise CallError("timeout", "timed out after 2.0s", api=api, attempts=3)
        try:
            await asyncio.sleep(0.01 if api == "score" else 0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return {"api": api, "params": dict(params), "nested": {"country": "FR"}}


def enricher(rules: list[dict[str, Any]], client: FakeClient, **extra: Any) -> Enricher:
    return Enricher(config_from_dict({"apis": APIS, "enrichments": rules, **extra}), client)


GEO_RULE = {
    "when": {"type": ["page_view", "login"]},
    "api": "geo",
    "params": {"ip": "client.ip"},
    "into": "geo",
    "select": "nested.country",
}
SCORE_RULE = {
    "when": {"type": "login"},
    "api": "score",
    "params": {"user": "user.id", "amount": "amount"},
    "into": "risk",
}


async def test_matched_event_gets_the_selected_answer_and_keeps_its_fields() -> None:
    client = FakeClient()
    outcome = await enricher([GEO_RULE], client).enrich(
        b'{"type": "page_view", "client": {"ip": "1.2.3.4"}, "x": 1}'
    )
    assert outcome == Enriched(
        {"type": "page_view", "client": {"ip": "1.2.3.4"}, "x": 1, "enrichment": {"geo": "FR"}}
    )
    assert client.calls == [("geo", {"ip": "1.2.3.4"})]


async def test_several_rules_run_and_params_keep_their_json_types() -> None:
    client = FakeClient()
    event = {"type": "login", "client": {"ip": "1.2.3.4"}, "user": {"id": 7}, "amount": 9.5}
    outcome = await enricher([GEO_RULE, SCORE_RULE], client).enrich(json.dumps(event).encode())
    assert isinstance(outcome, Enriched)
    assert outcome.event["enrichment"]["geo"] == "FR"
    assert outcome.event["enrichment"]["risk"]["params"] == {"user": 7, "amount": 9.5}


async def test_one_failing_rule_dead_letters_the_event_and_cancels_the_other_call() -> None:
    client = FakeClient(fail="geo")
    event = {"type": "login", "client": {"ip": "1.2.3.4"}, "user": {"id": 7}, "amount": 1}
    outcome = await enricher([SCORE_RULE, GEO_RULE], client).enrich(json.dumps(event).encode())
    assert isinstance(outcome, DeadLetter)
    assert outcome.event == event
    assert outcome.error.as_dict() == {
        "kind": "timeout",
        "message": "timed out after 2.0s",
        "api": "geo",
        "status": None,
        "attempts": 3,
    }
    await asyncio.sleep(0)
    assert client.cancelled == 1


class EagerClient(FakeClient):
    """Like ApiCaller: a param that cannot go into the URL fails the call at once, unawaited."""

    def call(self, api: str, params: Mapping[str, Any], lane: Any = None) -> Any:
        if api == self.fail:
            raise InvalidEvent(f"param 'user' of api '{api}' is null")
        return super().call(api, params, lane)


async def test_a_call_failing_before_it_is_awaited_cancels_the_calls_started_before_it() -> None:
    client = EagerClient(fail="geo")
    event = {"type": "login", "client": {"ip": "1.2.3.4"}, "user": {"id": 7}, "amount": 1}
    before = asyncio.all_tasks()
    outcome = await enricher([SCORE_RULE, GEO_RULE], client).enrich(json.dumps(event).encode())
    assert isinstance(outcome, DeadLetter)
    assert outcome.error.kind == "invalid_event"
    assert "param 'user' of api 'geo'" in outcome.error.message
    (score_call,) = asyncio.all_tasks() - before  # the score call, started first
    with pytest.raises(asyncio.CancelledError):  # not left running for an event already failed
        await score_call
    assert client.cancelled == 0 and not client.calls  # cancelled before it made its call


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{nope", "not valid JSON"),
        (b"[1]", "not an object"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (None, "tombstone"),
    ],
)
def test_bad_records_are_invalid_events(raw: bytes | None, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        decode_event(raw, max_bytes=10_000_000)


def test_oversized_record_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidEvent, match="over the 10-byte limit"):
        decode_event(b'{"a": "0123456789"}', max_bytes=10)


async def test_missing_or_non_scalar_param_is_an_invalid_event_naming_it() -> None:
    client = FakeClient()
    missing = await enricher([GEO_RULE], client).enrich(b'{"type": "login", "client": {}}')
    assert isinstance(missing, DeadLetter) and missing.error.kind == "invalid_event"
    assert "client.ip" in missing.error.message and missing.error.api == "geo"
    nested = await enricher([GEO_RULE], client).enrich(b'{"type": "login", "client": {"ip": [1]}}')
    assert isinstance(nested, DeadLetter) and "not a scalar" in nested.error.message
    assert client.calls == []


async def test_select_missing_from_the_answer_is_a_bad_response() -> None:
    rule = {**GEO_RULE, "select": "nested.city"}
    outcome = await enricher([rule], FakeClient()).enrich(
        b'{"type": "login", "client": {"ip": "1"}}'
    )
    assert isinstance(outcome, DeadLetter) and outcome.error.kind == "bad_response"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("passthrough", Enriched({"type": "click", "enrichment": {}})),
        ("drop", Dropped()),
    ],
)
async def test_unmatched_policies(policy: str, expected: Any) -> None:
    outcome = await enricher([GEO_RULE], FakeClient(), unmatched=policy).enrich(
        b'{"type": "click"}'
    )
    assert outcome == expected


async def test_unmatched_dead_letter_policy() -> None:
    outcome = await enricher([GEO_RULE], FakeClient(), unmatched="dead_letter").enrich(
        b'{"type": "click"}'
    )
    assert isinstance(outcome, DeadLetter) and outcome.error.kind == "invalid_event"


def test_get_path_follows_dicts_and_list_indexes() -> None:
    data = {"a": {"b": [{"c": 1}, {"c": 2}]}, "n": None}
    assert get_path(data, "a.b.1.c") == 2
    assert get_path(data, "n") is None
    assert get_path(data, "a.b.2.c") is MISSING
    assert get_path(data, "a.x") is MISSING
    assert get_path(data, "a.b.c") is MISSING
