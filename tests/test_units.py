"""The human units of the config file: parsing, rejection of bad input, and exact round trips."""

from __future__ import annotations

import pytest

from enricher import units


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("100ms", 0.1),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("0", 0.0),
        ("0s", 0.0),
        (" 30 ", 30.0),
        ("2 s", 2.0),
        (30, 30.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert units.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad", ["", "2x", "s", "-1s", "1.2.3s", "2 seconds", True, None, [1], -1, "1e999"]
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        units.parse_duration(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (0.1, "100ms"),
        (2.0, "2s"),
        (60.0, "1m"),
        (90.0, "90s"),
        (3600.0, "1h"),
        (86400.0, "1d"),
        (1.5, "1500ms"),
        (0.0005, "0.0005s"),
    ],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert units.format_duration(seconds) == text
    assert units.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("50/s", (50, 1.0)),
        ("50/sec", (50, 1.0)),
        ("50/second", (50, 1.0)),
        ("3000/m", (3000, 60.0)),
        ("3000/min", (3000, 60.0)),
        ("50/minute", (50, 60.0)),
        ("100/h", (100, 3600.0)),
        ("100/hour", (100, 3600.0)),
        ("1/30s", (1, 30.0)),
        (" 7 / s ", (7, 1.0)),
    ],
)
def test_parse_rate(text: str, parts: tuple[int, float]) -> None:
    assert units.parse_rate(text) == parts


@pytest.mark.parametrize("bad", ["50", "50 per s", "50/x", "/s", "-5/s", "1.5/s", 50, None, "5/0s"])
def test_parse_rate_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"N/s|positive"):
        units.parse_rate(bad)


def test_parse_rate_rejects_zero() -> None:
    with pytest.raises(ValueError, match="positive"):
        units.parse_rate("0/s")


@pytest.mark.parametrize(
    ("count", "per", "text"),
    [(50, 1.0, "50/s"), (3000, 60.0, "3000/m"), (100, 3600.0, "100/h"), (1, 30.0, "1/30s")],
)
def test_format_rate_round_trips(count: int, per: float, text: str) -> None:
    assert units.format_rate(count, per) == text
    assert units.parse_rate(text) == (count, per)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("100000/day", (100000, "day")),
        ("100000/d", (100000, "day")),
        ("500/minute", (500, "minute")),
        ("500/min", (500, "minute")),
        ("10/hour", (10, "hour")),
        ("10/h", (10, "hour")),
        ("1000000/month", (1000000, "month")),
        ("1000000/mo", (1000000, "month")),
    ],
)
def test_parse_quota(text: str, parts: tuple[int, str]) -> None:
    assert units.parse_quota(text) == parts
    assert units.parse_quota(units.format_quota(*units.parse_quota(text))) == parts


@pytest.mark.parametrize("bad", ["100000", "100/week", "100/year", "0/day", "x/day", 5, None])
def test_parse_quota_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"N/minute|positive"):
        units.parse_quota(bad)


def test_parse_backoff() -> None:
    assert units.parse_backoff("100ms..10s") == (0.1, 10.0)
    assert units.parse_backoff("1..2") == (1.0, 2.0)
    assert units.parse_backoff("1s") == (1.0, 1.0)
    assert units.format_backoff(0.1, 10.0) == "100ms..10s"


@pytest.mark.parametrize("bad", ["..", "1s..", "x..1s", "1s..2s..3s", None])
def test_parse_backoff_rejects_malformed(bad: object) -> None:
    with pytest.raises(ValueError, match=r"MIN\.\.MAX"):
        units.parse_backoff(bad)


def test_parse_backoff_rejects_inverted_bounds() -> None:
    with pytest.raises(ValueError, match="minimum 10s exceeds the maximum 1s"):
        units.parse_backoff("10s..1s")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1MiB", 1_048_576),
        ("512KB", 512_000),
        ("512kb", 512_000),
        ("2KiB", 2048),
        ("100B", 100),
        ("1GB", 10**9),
        ("1GiB", 1024**3),
        ("4096", 4096),
        (4096, 4096),
        (1024.0, 1024),
        (0, 0),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    assert units.parse_size(text) == size


@pytest.mark.parametrize("bad", ["1XB", "MiB", "1.5MiB", "-1", -1, True, None, 1.5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        units.parse_size(bad)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (1_048_576, "1MiB"),
        (512_000, "500KiB"),
        (500_000, "500KB"),
        (1000, "1KB"),
        (2048, "2KiB"),
        (1023, "1023B"),
        (2 * 10**9, "2GB"),
    ],
)
def test_format_size_round_trips(size: int, text: str) -> None:
    assert units.format_size(size) == text
    assert units.parse_size(text) == size
