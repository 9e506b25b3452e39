"""The command line as users run it: exit codes, messages, masking, and limits against Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from enricher.services import EmbeddedRedis


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "enricher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "enricher.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def config(redis_url: str = "redis://127.0.0.1:1/0") -> dict[str, Any]:
    return {
        "app_id": "cli-test",
        "redis": {"url": redis_url},
        "apis": {
            "geo": {
                "url": "https://geo.example.com/{ip}",
                "rate": "50/s",
                "headers": {"X-Api-Key": "${GEO_KEY}"},
                "quotas": ["1000/day"],
            }
        },
        "enrichments": [{"api": "geo", "params": {"ip": "ip"}, "into": "geo"}],
    }


def test_check_config_prints_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = write(tmp_path, config(redis_url="redis://:hunter2@127.0.0.1:6379/0"))
    result = run("check-config", str(path), env={"GEO_KEY": "canary-SECRET-42"})
    assert result.returncode == 0, result.stderr
    assert "canary-SECRET-42" not in result.stdout and "hunter2" not in result.stdout
    effective = yaml.safe_load(result.stdout)
    assert effective["apis"]["geo"]["headers"] == {"X-Api-Key": "***"}
    assert effective["apis"]["geo"]["burst"] == 50  # default: one second's worth
    assert effective["unmatched"] == "passthrough"


def test_check_config_names_the_bad_key_and_exits_2(tmp_path: Path) -> None:
    data = config()
    data["apis"]["geo"]["retry"] = {"atempts": 3}
    result = run("check-config", str(write(tmp_path, data)), env={"GEO_KEY": "x"})
    assert result.returncode == 2
    assert "apis.geo.retry.atempts" in result.stderr


def test_config_default_path_comes_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, config())
    result = run("check-config", env={"ENRICHER_CONFIG": str(path), "GEO_KEY": "x"})
    assert result.returncode == 0, result.stderr
    missing = run("check-config", env={"ENRICHER_CONFIG": str(tmp_path / "nope.yaml")})
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_unreachable_redis_is_exit_1_with_one_line(tmp_path: Path) -> None:
    result = run("limits", "show", "--config", str(write(tmp_path, config())), env={"GEO_KEY": "x"})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "redis" in result.stderr.lower()


@pytest.fixture(scope="module")
def redis() -> Any:
    with EmbeddedRedis() as server:
        yield server


def test_limits_set_show_reset_round_trip(tmp_path: Path, redis: EmbeddedRedis) -> None:
    path = str(write(tmp_path, config(redis.url)))
    env = {"GEO_KEY": "x"}
    shown = json.loads(run("limits", "show", "--config", path, "--json", env=env).stdout)
    geo = shown["apis"][0]
    assert (geo["api"], geo["rate_per_second"], geo["burst"]) == ("geo", 50.0, 50)
    assert [(q["period"], q["limit"], q["used"]) for q in geo["quotas"]] == [("day", 1000, 0)]

    result = run(
        "limits", "set", "--config", path, "geo", "--rate", "5/s", "--quota", "10/minute", env=env
    )
    assert result.returncode == 0, result.stderr
    geo = json.loads(run("limits", "show", "--config", path, "--json", env=env).stdout)["apis"][0]
    assert geo["rate_per_second"] == 5.0
    assert sorted((q["period"], q["limit"]) for q in geo["quotas"]) == [
        ("day", 1000),
        ("minute", 10),
    ]
    human = run("limits", "show", "--config", path, env=env).stdout
    assert "rate 5/s (override; config 50/s)" in human

    assert run("limits", "reset", "--config", path, "geo", env=env).returncode == 0
    geo = json.loads(run("limits", "show", "--config", path, "--json", env=env).stdout)["apis"][0]
    assert geo["rate_per_second"] == 50.0 and geo["overrides"] == {}


def test_limits_set_rejects_bad_arguments_naming_them(tmp_path: Path, redis: EmbeddedRedis) -> None:
    path = str(write(tmp_path, config(redis.url)))
    env = {"GEO_KEY": "x"}
    unknown = run("limits", "set", "--config", path, "nope", "--rate", "1/s", env=env)
    assert unknown.returncode == 2 and "unknown API 'nope'" in unknown.stderr
    bad_rate = run("limits", "set", "--config", path, "geo", "--rate", "fast", env=env)
    assert bad_rate.returncode == 2 and "--rate" in bad_rate.stderr
    nothing = run("limits", "set", "--config", path, "geo", env=env)
    assert nothing.returncode == 2
