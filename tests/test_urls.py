"""URL templates: event values fill path segments and query values only, always encoded."""

from __future__ import annotations

import random
import string
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from yarl import URL

from enricher.urls import UrlTemplate, build_request_url, param_to_str

TEMPLATE = "https://api.example.com:8443/v1/geo/{ip}/info?lang={lang}&fixed=1"

HOSTILE = [
    "../../admin",
    "..%2F..%2Fadmin",
    "%2e%2e",
    "a/b/c",
    "/leading",
    "trailing/",
    "?x=1",
    "&injected=1",
    "a=b&c=d",
    "#frag",
    "@evil.com",
    "user:pass@evil.com",
    "evil.com:80",
    "http://evil.com/",
    "//evil.com/x",
    "https://evil.com:443/path?q=1#f",
    "\r\nHost: evil.com\r\n",
    "line\nbreak",
    "tab\there",
    "nul\x00byte",
    " spaces  ",
    "%",
    "%%",
    "%41",
    "100%",
    "\\..\\windows",
    "{ip}",
    "{",
    "}",
    "ü-ñ-日本語",
    "emoji-🙂",
    "\u202eRTL",
    ";param=1",
    "a+b",
    "'\"<>`",
    "...",
    ".hidden",
    "x" * 5000,
]

_POOL = string.printable + "üß日本\u202e\u0000🙂%/?#@:.."


def _random_values(count: int, seed: int = 20240601) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 40))) for _ in range(count)]


def _assert_contained(url: str, ip: str, lang: str) -> None:
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port) == ("https", "api.example.com", 8443)
    assert parts.username is None and parts.fragment == ""
    segments = parts.path.split("/")
    assert segments[:3] == ["", "v1", "geo"] and segments[4:] == ["info"]
    assert unquote(segments[3]) == ip
    assert parse_qsl(parts.query, keep_blank_values=True) == [("lang", lang), ("fixed", "1")]
    assert all(33 <= ord(char) < 127 for char in url), "only visible ASCII goes on the wire"
    sent = URL(url, encoded=True)
    assert (sent.host, sent.port, sent.raw_path) == ("api.example.com", 8443, parts.path)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_cannot_escape_their_slot(value: str) -> None:
    url = UrlTemplate(TEMPLATE).render({"ip": value, "lang": value})
    _assert_contained(url, value, value)


def test_random_values_cannot_escape_their_slot() -> None:
    template = UrlTemplate(TEMPLATE)
    for ip, lang in zip(_random_values(1000), _random_values(1000, seed=7), strict=True):
        if ip in (".", ".."):
            continue  # refused: see the next test
        _assert_contained(template.render({"ip": ip, "lang": lang}), ip, lang)


@pytest.mark.parametrize("value", [".", "..", ""])
def test_values_that_would_change_the_path_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="path"):
        UrlTemplate(TEMPLATE).render({"ip": value, "lang": "en"})


def test_dot_segment_made_with_literal_text_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'\.\.'"):
        UrlTemplate("http://h/a/.{x}/b").render({"x": "."})


def test_dots_and_empty_query_values_are_fine() -> None:
    template = UrlTemplate(TEMPLATE)
    assert template.render({"ip": "1.2.3.4", "lang": ""}) == (
        "https://api.example.com:8443/v1/geo/1.2.3.4/info?lang=&fixed=1"
    )
    assert template.render({"ip": "...", "lang": ".."}).startswith(
        "https://api.example.com:8443/v1/geo/.../info?lang=..&"
    )


def test_lone_surrogate_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        UrlTemplate(TEMPLATE).render({"ip": "\ud800", "lang": "en"})


def test_placeholders_and_literal_parts() -> None:
    template = UrlTemplate("http://127.0.0.1:8081/a%20b/{x}-{y}.json?k={z}&raw=%2F&flag")
    assert template.placeholders == frozenset({"x", "y", "z"})
    assert template.render({"x": "1 2", "y": "é", "z": "a&b"}) == (
        "http://127.0.0.1:8081/a%20b/1%202-%C3%A9.json?k=a%26b&raw=%2F&flag"
    )


def test_missing_placeholder_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="lang"):
        UrlTemplate(TEMPLATE).render({"ip": "1"})


def test_extra_params_are_ignored_and_fragment_dropped() -> None:
    url = build_request_url("http://h/x/{a}#top", {"a": "1", "b": "2"})
    assert url == "http://h/x/1"


@pytest.mark.parametrize(
    "template",
    [
        "http://{host}/x",
        "http://api.{tld}/x",
        "http://h:{port}/x",
        "http://{user}@h/x",
        "{scheme}://h/x",
        "{base}/x",
        "ftp://h/{x}",
        "/relative/{x}",
        "http:///no-host",
        "http://h/x?{key}=1",
        "http://h/x#{frag}",
        "http://h/{unclosed",
        "http://h/x}",
        "http://h/{bad-name}",
        "http://h:99999/x",
    ],
)
def test_bad_templates_are_refused_at_parse_time(template: str) -> None:
    with pytest.raises(ValueError):
        UrlTemplate(template)


@pytest.mark.parametrize(
    ("value", "text"),
    [("a b", "a b"), (True, "true"), (False, "false"), (0, "0"), (-12, "-12"), (1.5, "1.5")],
)
def test_param_to_str(value: object, text: str) -> None:
    assert param_to_str(value) == text


@pytest.mark.parametrize("value", [None, [1], {"a": 1}, b"bytes"])
def test_param_to_str_refuses_non_scalars(value: object) -> None:
    with pytest.raises(ValueError):
        param_to_str(value)
