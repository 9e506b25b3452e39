"""``enricher sandbox-api`` as users run it: a foreground server on a free port, stopped by
SIGTERM, whose bad options exit 2 naming the option."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from enricher.sandbox import geo_answer


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``enricher sandbox-api --port 0 ARGS``; returns the process and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "enricher", "sandbox-api", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # "sandbox API on http://127.0.0.1:PORT (...)"
    url = next((word for word in first.split() if word.startswith("http://")), None)
    assert url, f"no URL announced: {first!r}"
    return proc, url


def get(url: str, timeout: float = 10.0) -> tuple[int, Any, dict[str, str]]:
    """GET ``url``, retrying connection refusals until the server listens."""
    for _ in range(100):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, json.load(response), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc), dict(exc.headers)
        except urllib.error.URLError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


@pytest.fixture
def sandbox_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc, url = start("--rate", "2/s", "--burst", "2", "--latency", "1ms..5ms")
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_answers_geo_and_stats_and_stops_on_sigterm(
    sandbox_process: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = sandbox_process
    status, body, _ = get(f"{url}/geo/1.2.3.4")
    assert (status, body) == (200, geo_answer("1.2.3.4"))
    get(f"{url}/geo/1.2.3.5")
    status, body, headers = get(f"{url}/geo/1.2.3.6")  # over --rate 2/s --burst 2
    assert status == 429 and int(headers["Retry-After"]) >= 1
    status, stats, _ = get(f"{url}/stats")
    assert status == 200
    assert (stats["calls"], stats["ok"], stats["rejected_429"]) == (3, 2, 1)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--rate", "fast"], "--rate"),
        (["--rate", "0"], "--rate"),
        (["--rate", "5/fortnight"], "--rate"),
        (["--latency", "200ms..20ms"], "--latency"),
        (["--latency", "soon"], "--latency"),
        (["--error-rate", "1.5"], "--error-rate"),
        (["--burst", "0"], "--burst"),
    ],
)
def test_bad_options_exit_2_naming_the_option(args: list[str], named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "enricher", "sandbox-api", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    assert named in result.stderr
    assert "Traceback" not in result.stderr
