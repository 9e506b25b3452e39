"""``enricher dev`` unattended: the whole stack comes up, enriches within every limit, and stops
every process it started, at the end of ``--duration`` or on SIGINT (Ctrl-C) or SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer

from enricher.config import load_config, parse_config
from enricher.demo import DemoEvents
from enricher.dev import effective_config, sandbox_url
from enricher.errors import InvalidEvent
from enricher.rules import CompiledRule
from enricher.services import EmbeddedKafka

pytestmark = pytest.mark.integration

EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "enricher.yaml"
COMMAND = [sys.executable, "-m", "enricher", "dev", "--no-tty", "--events-per-second", "20"]


def started_pids(output: str) -> dict[str, int]:
    """``started pids: kafka=1 redis=2 worker-1=3 worker-2=4`` -> {name: pid}."""
    match = re.search(r"^started pids: (.+)$", output, re.MULTILINE)
    assert match, f"no 'started pids' line in:\n{output}"
    pairs = (item.split("=") for item in match.group(1).split())
    return {name: int(pid) for name, pid in pairs}


def summary_value(output: str, name: str) -> str:
    match = re.search(rf"^  {re.escape(name)}: (.+)$", output, re.MULTILINE)
    assert match, f"no '{name}:' line in the summary:\n{output}"
    return match.group(1)


def alive(pid: int) -> bool:
    """Running (not a zombie) right now."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def assert_nothing_left(pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 3  # reaped before exit; a little slack for the kernel
    while time.monotonic() < deadline and any(alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    left = {name: pid for name, pid in pids.items() if alive(pid)}
    for pid in left.values():
        os.kill(pid, signal.SIGKILL)
    assert not left, f"left running after exit: {left}"


def test_a_timed_run_enriches_within_the_limits_and_leaves_nothing() -> None:
    result = subprocess.run(
        [*COMMAND, "--duration", "12s"], capture_output=True, text=True, timeout=90
    )
    output = result.stdout
    assert result.returncode == 0, f"{output}\n{result.stderr}"
    pids = started_pids(output)
    assert {"kafka", "redis", "worker-1", "worker-2"} <= pids.keys()
    assert int(summary_value(output, "enriched")) > 0
    assert summary_value(output, "limits") == "none exceeded"
    assert summary_value(output, "workers") == "2 started, 0 died"
    for line in output.splitlines():
        if line.startswith("  api "):
            calls = re.search(r"max (\d+) calls in any second, .* = (\d+(?:\.\d+)?)$", line)
            assert calls and int(calls.group(1)) <= float(calls.group(2)), line
    assert re.search(r"^\[\s*\d+s\] produced \d+", output, re.MULTILINE), "no progress lines"
    assert_nothing_left(pids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_everything_it_started(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        COMMAND,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:  # up to the first progress line: the stack is up and running
            lines.append(line)
            if line.startswith("["):
                break
        proc.send_signal(sig)
        rest, errors = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + rest
    assert proc.returncode == 0, f"{output}\n{errors}"
    assert "interrupted" in output
    assert summary_value(output, "limits") == "none exceeded"
    assert_nothing_left(started_pids(output))


# --- the demo events (`enricher produce --demo N`, and the dev stack's producer) ---------------


def test_demo_events_are_seeded_and_exercise_every_path() -> None:
    events = DemoEvents(7).take(400)
    assert events == DemoEvents(7).take(400) and events != DemoEvents(8).take(400)
    config = load_config(EXAMPLE_CONFIG, env={})
    rules = [CompiledRule(rule) for rule in config.enrichments]
    outcomes: Counter[str] = Counter()
    for event in events:
        matched = [rule for rule in rules if rule.matches(event)]
        try:
            for rule in matched:
                rule.request_params(event)
            outcomes["+".join(rule.into for rule in matched) or "unmatched"] += 1
        except InvalidEvent:
            outcomes["invalid"] += 1
    assert set(outcomes) == {"geo", "risk", "unmatched", "invalid"}, outcomes
    assert outcomes["geo"] > outcomes["unmatched"] > outcomes["risk"] > outcomes["invalid"] > 0
    assert all(isinstance(event["user_id"], str) for event in events)


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


async def test_produce_demo_sends_events_keyed_by_user(
    kafka: EmbeddedKafka, tmp_path: Path
) -> None:
    topic = f"demo-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "enricher.yaml"
    path.write_text(
        yaml.safe_dump(
            {"kafka": {"broker": kafka.url, "partitions": 2}, "topics": {"input": topic}}
        )
    )
    args = [sys.executable, "-m", "enricher", "produce", "--config", str(path), "--demo", "25"]
    result = await asyncio.to_thread(run, args)
    assert result.returncode == 0, result.stderr
    assert "produced 25 demo event(s)" in result.stderr

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        records = []
        async with asyncio.timeout(20):
            while len(records) < 25:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    events = [json.loads(record.value) for record in records]
    assert sorted(e["event_id"] for e in events) == sorted(
        e["event_id"] for e in DemoEvents().take(25)
    )
    assert all(record.key == json.loads(record.value)["user_id"].encode() for record in records)

    both = await asyncio.to_thread(run, [*args, str(EXAMPLE_CONFIG.with_name("events.jsonl"))])
    assert both.returncode == 2 and "--demo" in both.stderr


def test_effective_config_points_the_example_at_the_embedded_services() -> None:
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    urls = {
        name: sandbox_url(api["url"], f"http://127.0.0.1:{9000 + n}")
        for n, (name, api) in enumerate(raw["apis"].items())
    }
    data = effective_config(
        raw, kafka_url="kafka://127.0.0.1:1111", redis_url="redis://127.0.0.1:2222/0", api_urls=urls
    )
    config = parse_config(yaml.safe_dump(data), env={"GEO_KEY": "k-1"})
    assert config.kafka.broker == ("kafka://127.0.0.1:1111",)
    assert (config.kafka.rebalance_timeout, config.kafka.session_timeout) == (3.0, 3.0)
    assert config.redis.url == "redis://127.0.0.1:2222/0"
    assert config.apis["geo"].url == "http://127.0.0.1:9000/geo/{ip}"
    assert config.apis["score"].url == "http://127.0.0.1:9001/score"
    assert config.apis["geo"].headers == {"X-Api-Key": "k-1"}  # still read from the environment
    original = load_config(EXAMPLE_CONFIG, env={})
    assert config.enrichments == original.enrichments and config.topics == original.topics
