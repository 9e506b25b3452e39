"""Replay logic without services: the window, the dry-run planner, dead-letter selection."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from enricher.cache import request_key
from enricher.config import Config, config_from_dict
from enricher.dlq import LetterFilter, RedriveSelection, parse_kinds, parse_statuses, refeed_of
from enricher.errors import BadArgument
from enricher.quota import ApiUsage
from enricher.replay_cli import default_share
from enricher.replay_plan import Planner, human
from enricher.replay_scan import ScannedRecord, Window, parse_time, parse_window
from enricher.replay_watch import _Lines, check_id

NOW = datetime(2025, 3, 10, 12, 0, 0, tzinfo=UTC)


# --- the window -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-10T08:30:00Z", datetime(2025, 3, 10, 8, 30, tzinfo=UTC)),
        ("2025-03-10T08:30:00+02:00", datetime(2025, 3, 10, 6, 30, tzinfo=UTC)),
        ("2025-03-10T08:30:00", datetime(2025, 3, 10, 8, 30, tzinfo=UTC)),  # naive = UTC
        ("2025-03-10 08:30", datetime(2025, 3, 10, 8, 30, tzinfo=UTC)),
        ("2025-03-09", datetime(2025, 3, 9, tzinfo=UTC)),
        ("-2h", NOW - timedelta(hours=2)),
        ("-30m", NOW - timedelta(minutes=30)),
        ("-1d", NOW - timedelta(days=1)),
        ("-90s", NOW - timedelta(seconds=90)),
        ("now", NOW),
        (" NOW ", NOW),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    parsed = parse_time(text, now=NOW)
    assert parsed == expected and parsed.tzinfo is not None


@pytest.mark.parametrize("text", ["yesterday", "-2x", "2025-13-01", "", "2h", "--2h"])
def test_bad_times_name_the_option(text: str) -> None:
    with pytest.raises(BadArgument) as caught:
        parse_time(text, now=NOW, option="--to")
    assert caught.value.key == "--to" and "-2h" in caught.value.message


def test_window_defaults_to_now_and_is_half_open() -> None:
    window = parse_window("-1h", None, now=NOW)
    assert window == Window(NOW - timedelta(hours=1), NOW)
    assert window.start_ms in window and window.end_ms - 1 in window
    assert window.end_ms not in window and window.start_ms - 1 not in window
    assert parse_window("-1h", "2030-01-01", now=NOW).end == NOW  # the future is live traffic


@pytest.mark.parametrize(("start", "end"), [("-1h", "-2h"), ("now", None), ("-1h", "-1h")])
def test_empty_windows_are_refused(start: str, end: str | None) -> None:
    with pytest.raises(BadArgument) as caught:
        parse_window(start, end, now=NOW)
    assert caught.value.key == "--from"


def test_replay_ids_are_checked() -> None:
    assert check_id("r20250310T120000-3f9a2c") == "r20250310T120000-3f9a2c"
    with pytest.raises(BadArgument):
        check_id("r2025*")


def test_human_durations() -> None:
    assert [human(s) for s in (0, 0.2, 45, 250, 3600, 12_000, 90_000)] == [
        "0s",
        "1s",
        "45s",
        "4m 10s",
        "1h",
        "3h 20m",
        "1d 1h",
    ]


# --- the planner ----------------------------------------------------------------------------


def config(**geo: Any) -> Config:
    return config_from_dict(
        {
            "apis": {
                "geo": {
                    "url": "http://127.0.0.1:1/geo/{ip}",
                    "rate": "10/s",
                    "quotas": ["1000/day"],
                    "cache_ttl": "1h",
                    "replay_share": 0.5,
                    **geo,
                },
                "user": {"url": "http://127.0.0.1:1/u/{id}", "rate": "5/s", "replay_share": 0.3},
                "unused": {"url": "http://127.0.0.1:1/x", "rate": "1/s", "replay_share": 0.1},
            },
            "enrichments": [
                {"when": {"type": "page_view"}, "api": "geo", "params": {"ip": "ip"}, "into": "g"},
                {"when": {"type": "page_view"}, "api": "user", "params": {"id": "u"}, "into": "u"},
            ],
        }
    )


def records() -> list[bytes | None]:
    ips = ["1.1.1.1", "2.2.2.2", "1.1.1.1", "3.3.3.3", "4.4.4.4"] * 2
    values: list[bytes | None] = [
        json.dumps({"type": "page_view", "ip": ip, "u": f"u{i % 2}"}).encode()
        for i, ip in enumerate(ips)
    ]
    values += [b"{not json", None]  # invalid
    values.append(json.dumps({"type": "page_view", "u": "u1"}).encode())  # no ip: invalid
    values += [json.dumps({"type": "click", "n": n}).encode() for n in range(3)]  # no rule
    return values


def fake_cache(config: Config, cached_ips: set[str]) -> Any:
    geo = config.apis["geo"]
    stored = {request_key(geo, {"ip": ip}) for ip in cached_ips}
    asked: list[tuple[str, int]] = []

    async def contains(api: str, keys: Sequence[str]) -> list[bool]:
        asked.append((api, len(keys)))
        return [api == "geo" and key in stored for key in keys]

    contains.asked = asked  # type: ignore[attr-defined]
    return contains


def usage(config: Config, api: str, used_today: int) -> ApiUsage:
    return ApiUsage.build(config.apis[api], {}, {"day": used_today}, 0.0, NOW.timestamp())


async def test_planner_counts_distinct_cached_needed_and_duration() -> None:
    cfg = config()
    planner = Planner(cfg)
    planner.add_all(records())
    contains = fake_cache(cfg, {"1.1.1.1"})
    plan = await planner.estimate(
        share=0.5, contains=contains, usages={"geo": usage(cfg, "geo", 100)}
    )

    assert (plan.events, plan.matched, plan.invalid, plan.unmatched) == (16, 10, 3, 3)
    geo, user = plan.apis
    assert (geo.api, geo.requests, geo.distinct, geo.cached, geo.calls_needed) == (
        "geo",
        10,
        4,
        1,
        3,
    )
    assert geo.seconds == pytest.approx(3 / 5)  # 10/s x 0.5
    # no cache for `user`: every request is a call, however many are alike
    assert (user.requests, user.distinct, user.cached, user.calls_needed) == (10, 2, 0, 10)
    assert user.cache_enabled is False and user.seconds == pytest.approx(10 / 2.5)
    assert plan.seconds == pytest.approx(4.0) and plan.calls_needed == 13
    (quota,) = geo.quotas
    assert (quota.remaining, quota.budget, quota.runs_out) == (900, 450, False)
    assert not plan.runs_out and user.quotas == ()
    assert contains.asked == [("geo", 4)]  # one batch, only for the cached API
    assert "3 API calls needed" in plan.render() and "about 4s" in plan.render()


async def test_planner_says_when_a_quota_share_runs_out_first() -> None:
    cfg = config()
    planner = Planner(cfg)
    planner.add_all(records())
    plan = await planner.estimate(
        share=0.5, contains=fake_cache(cfg, set()), usages={"geo": usage(cfg, "geo", 994)}
    )
    geo = plan.apis[0]
    assert geo.calls_needed == 4
    (quota,) = geo.quotas
    assert (quota.remaining, quota.budget, quota.runs_out) == (6, 3, True)  # 4 > 0.5 x 6
    assert geo.runs_out == ("day",) and plan.runs_out
    data = plan.as_dict()
    assert data["quota_runs_out"] is True and data["apis"][0]["quotas"][0]["replay_budget"] == 3
    assert "RUNS OUT after 3 calls" in plan.render()
    json.dumps(data)  # JSON-ready


async def test_planner_without_usage_uses_the_config_and_empty_input() -> None:
    cfg = config()
    plan = await Planner(cfg).estimate(share=1.0, contains=fake_cache(cfg, set()), usages={})
    assert plan.events == 0 and plan.seconds == 0 and plan.calls_needed == 0
    assert [q.remaining for q in plan.apis[0].quotas] == [1000]


def test_default_share_is_the_lowest_of_the_apis_the_rules_use() -> None:
    assert default_share(config()) == 0.3  # `unused` (0.1) has no rule
    assert default_share(config_from_dict({})) == 1.0


# --- dead letters ---------------------------------------------------------------------------


def letter(kind: str, status: int | None, event: Any, source: Any = None) -> dict[str, Any]:
    return {
        "event": event,
        "error": {"kind": kind, "message": "m", "api": "geo", "status": status, "attempts": 5},
        "source": source or {"topic": "events", "partition": 2, "offset": 41},
    }


def test_letter_filter_by_kind_and_status() -> None:
    filter_ = LetterFilter(parse_kinds(["http_status,timeout"]), parse_statuses(["5xx", "429"]))
    assert filter_.matches(letter("http_status", 503, {}))
    assert filter_.matches(letter("http_status", 429, {}))
    assert not filter_.matches(letter("http_status", 404, {}))
    assert not filter_.matches(letter("timeout", None, {}))  # a status is asked for
    assert not filter_.matches(letter("connection", 503, {}))
    assert LetterFilter().matches(letter("invalid_event", None, "raw"))
    assert LetterFilter(parse_kinds(["timeout"])).matches(letter("timeout", None, {}))


@pytest.mark.parametrize(
    ("option", "values"), [("--kind", ["bogus"]), ("--status", ["600"]), ("--status", ["5x"])]
)
def test_bad_filters_name_the_option(option: str, values: list[str]) -> None:
    parse = parse_kinds if option == "--kind" else parse_statuses
    with pytest.raises(BadArgument) as caught:
        parse(values)
    assert caught.value.key == option


def test_refeed_of_a_letter_keeps_key_event_and_origin() -> None:
    record = ScannedRecord("events.dlq", 0, 7, 1_700_000_000_000, b"k1", None)
    refeed = refeed_of(record, letter("http_status", 503, {"type": "page_view", "ip": "é"}))
    assert refeed is not None
    assert (refeed.key, refeed.partition, refeed.origin) == (b"k1", 2, "events/2/41")
    assert json.loads(refeed.value or b"") == {"type": "page_view", "ip": "é"}
    assert refeed.timestamp_ms == 1_700_000_000_000
    raw = refeed_of(record, letter("invalid_event", None, "{not json", source={"x": 1}))
    assert raw is not None and raw.value == b"{not json"
    assert (raw.partition, raw.origin) == (-1, "events.dlq/0/7")  # no source: the letter's own
    assert refeed_of(record, letter("timeout", None, 42)) is None


def test_redrive_selection_counts() -> None:
    selection = RedriveSelection(LetterFilter(parse_kinds(["timeout"])))
    batch = [
        ScannedRecord("d", 0, 0, 1, b"a", json.dumps(letter("timeout", None, {"a": 1})).encode()),
        ScannedRecord("d", 0, 1, 1, b"b", json.dumps(letter("http_status", 500, {})).encode()),
        ScannedRecord("d", 0, 2, 1, b"c", b"garbage"),
        ScannedRecord("d", 0, 3, 1, b"d", json.dumps(letter("timeout", None, [1])).encode()),
    ]
    chosen = selection.refeeds(batch)
    assert [r.key for r in chosen] == [b"a"]
    assert (selection.letters, selection.selected, selection.unreadable) == (3, 1, 2)
    assert selection.by_kind == {"timeout": 1}


# --- progress lines -------------------------------------------------------------------------


def test_progress_lines_every_few_seconds_with_an_eta() -> None:
    from enricher.replay import Replay

    lines: list[str] = []
    now = [0.0]
    display = _Lines(lambda text, err=False: lines.append(text), clock=lambda: now[0])

    def snapshot(finished: int, state: str = "running") -> Replay:
        return Replay("r1", state, "replay", NOW, NOW, 0.5, NOW, selected=100, outputs=finished)

    display.show(snapshot(0))
    now[0] = 1.0
    display.show(snapshot(10))  # too soon: no line
    now[0] = 5.0
    display.show(snapshot(50))
    now[0] = 6.0
    display.show(snapshot(100, "done"))  # a change of state: a line at once
    assert len(lines) == 3
    assert "50/100 finished" in lines[1] and "about 5s left" in lines[1]
    assert lines[2].startswith("r1 done")
