"""docker-compose.yml, the Dockerfile and the example configs, checked without Docker.

Docker is not needed (nor started): the compose file is loaded as YAML and checked against the
CLI (every command and option it runs exists), against the config it mounts (broker, Redis and API
addresses match the services), and the Dockerfile against the repository. Fast, no network.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from enricher.cli import cli
from enricher.config import Config, load_config
from enricher.errors import InvalidEvent
from enricher.rules import CompiledRule

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
EXAMPLE_CONFIG = ROOT / "examples" / "enricher.yaml"
COMPOSE_CONFIG = ROOT / "examples" / "docker-compose.yaml"
EVENTS = ROOT / "examples" / "events.jsonl"

# The sandbox API's endpoints the example configs may call (method, path template).
SANDBOX_ROUTES = {
    ("GET", "/geo/{ip}"),
    ("POST", "/score"),
    ("GET", "/fx/{base}/{quote}"),
}


def _load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


COMPOSE = _load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE.get("services") or {}


# --- helpers ---------------------------------------------------------------------------------


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def is_enricher(service: dict[str, Any]) -> bool:
    """Built from the repo's Dockerfile, whose ENTRYPOINT is ``enricher``."""
    return "build" in service


ENRICHER_SERVICES = sorted(name for name, svc in SERVICES.items() if is_enricher(svc))


def option_value(args: list[str], option: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as compose would pass it with nothing set on the host."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {
        str(key): _COMPOSE_VAR.sub(lambda m: m.group(2) or "", str(value))
        for key, value in env.items()
        if value is not None
    }


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (relative to the repo)."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume.get("target", "")
        else:
            source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def mounted_config(name: str) -> tuple[Path, Config]:
    """The host file behind the service's ``--config``, loaded as its container would load it."""
    service = SERVICES[name]
    container_path = option_value(command_of(service), "--config")
    assert container_path, f"{name}: runs enricher without --config"
    mounts = bind_mounts(service)
    assert container_path in mounts, f"{name}: --config {container_path} is not a mounted file"
    host_path = mounts[container_path]
    return host_path, load_config(host_path, env=compose_env(service))


def resolve_command(args: list[str]) -> tuple[list[str], click.Command, list[str]]:
    """Walk the click groups along ``args``: (command path, command, remaining args)."""
    command: click.Command = cli
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"`enricher {' '.join([*path, rest[0]])}` is not a command"
        path.append(rest.pop(0))
        command = sub
    assert not isinstance(command, click.Group), f"`enricher {' '.join(path)}` needs a subcommand"
    return path, command, rest


def check_invocation(args: list[str]) -> None:
    """Every option of ``args`` is one of its command's, with a valid value; positionals fit."""
    path, command, rest = resolve_command(args)
    where = f"`enricher {' '.join(path)}`"
    options: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                options[opt] = param
    positional_slots = sum(
        max(param.nargs, 1) if param.nargs != -1 else 10**6
        for param in command.params
        if isinstance(param, click.Argument)
    )
    positionals = 0
    ctx = click.Context(command, info_name="enricher")
    index = 0
    while index < len(rest):
        arg = rest[index]
        index += 1
        if arg.startswith("-") and arg != "-":
            name, has_inline, inline = arg.partition("=")
            assert name in options, f"{where} has no option {name} (it has {sorted(options)})"
            param = options[name]
            if param.is_flag or param.count:
                assert not has_inline, f"{where} {name} is a flag and takes no value"
                continue
            if has_inline:
                value = inline
            else:
                assert index < len(rest), f"{where} {name} needs a value"
                value = rest[index]
                index += 1
            if not isinstance(param.type, click.File | click.Path):
                param.type.convert(value, param, ctx)  # raises BadParameter on a bad value
        else:
            positionals += 1
    assert positionals <= positional_slots, f"{where} takes {positional_slots} argument(s)"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    pairs = []
    for line in logical:
        word, _, rest = line.partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether the Docker build context leaves ``relative`` out (last matching pattern wins)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip().strip("/")
        candidates = [glob, glob[3:]] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(p, g) for p in prefixes for g in candidates):
            excluded = not negated
    return excluded


def load_events() -> list[dict[str, Any]]:
    events = []
    for number, line in enumerate(EVENTS.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        event = json.loads(line)
        assert isinstance(event, dict), f"events.jsonl line {number} is not a JSON object"
        events.append(event)
    return events


# --- the services ----------------------------------------------------------------------------


def test_compose_has_the_stack() -> None:
    for name in ("kafka", "redis", "sandbox-api"):
        assert name in SERVICES, f"docker-compose.yml has no {name} service"
    workers = sum(
        int((svc.get("deploy") or {}).get("replicas", 1))
        for svc in SERVICES.values()
        if command_of(svc)[:1] == ["worker"]
    )
    assert workers >= 2, "the stack runs fewer than two enricher workers"
    assert SERVICES["redis"]["image"].startswith("redis:7")
    assert ENRICHER_SERVICES, "no service is built from the repo's Dockerfile"


def test_workers_share_one_config_and_wait_for_healthy_dependencies() -> None:
    workers = [name for name, svc in SERVICES.items() if command_of(svc)[:1] == ["worker"]]
    configs = {mounted_config(name)[0] for name in workers}
    assert len(configs) == 1, f"workers use different configs: {configs}"
    for name in workers:
        depends = SERVICES[name].get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on must name conditions"
        for needed in ("kafka", "redis"):
            assert needed in depends, f"{name} does not depend on {needed}"
            assert depends[needed].get("condition") == "service_healthy", (needed, name)
            assert SERVICES[needed].get("healthcheck", {}).get("test"), f"{needed}: no healthcheck"
        for dependency, spec in depends.items():
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
            if spec.get("condition") == "service_healthy":
                assert SERVICES[dependency].get("healthcheck"), f"{dependency}: no healthcheck"


def test_kafka_is_a_single_kraft_node() -> None:
    kafka = SERVICES["kafka"]
    assert str(kafka["image"]).startswith("apache/kafka"), "use the official Apache Kafka image"
    env = compose_env(kafka)
    roles = {role.strip() for role in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1 and voters[0].startswith(f"{node_id}@")
    listeners = _listeners(env["KAFKA_LISTENERS"])
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners and controller in protocols
    assert voters[0].rsplit(":", 1)[1] == str(listeners[controller][1])
    for name in (*listeners, *_listeners(env["KAFKA_ADVERTISED_LISTENERS"])):
        assert name in protocols, f"listener {name} has no security protocol"
    assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1


def _listeners(text: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    result = {}
    for item in text.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        result[name] = (host, int(port))
    return result


# --- the commands ----------------------------------------------------------------------------


def _command_params() -> list[Any]:
    return [pytest.param(name, command_of(SERVICES[name]), id=name) for name in ENRICHER_SERVICES]


@pytest.mark.parametrize(("service", "args"), _command_params())
def test_every_command_run_exists_in_the_cli(service: str, args: list[str]) -> None:
    assert args, f"{service}: no command (the image would only print --help)"
    check_invocation(args)


def test_the_command_checker_catches_mistakes() -> None:
    check_invocation(["worker", "--config", "/x.yaml", "--web-port", "0"])
    check_invocation(["produce", "--config", "/x.yaml", "--key-field", "user_id", "/e.jsonl"])
    for bad in (
        ["wroker", "--config", "/x.yaml"],
        ["worker", "--configs", "/x.yaml"],
        ["worker", "--web-port", "not-a-port"],
        ["worker", "--config"],
        ["limits"],
    ):
        with pytest.raises((AssertionError, click.BadParameter)):
            check_invocation(bad)


def test_sandbox_api_listens_on_all_interfaces_of_its_container() -> None:
    args = command_of(SERVICES["sandbox-api"])
    assert args[:1] == ["sandbox-api"]
    assert option_value(args, "--host") == "0.0.0.0", "127.0.0.1 is unreachable from the workers"
    port = option_value(args, "--port")
    assert port is not None and port.isdigit()
    published = [str(p).rsplit(":", 1)[-1] for p in SERVICES["sandbox-api"].get("ports") or []]
    assert not published or port in published


def test_enricher_services_mount_files_that_exist() -> None:
    for name, service in SERVICES.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        if not is_enricher(service):
            continue
        args = command_of(service)
        if args[:1] == ["produce"]:
            *_, source_file = args
            assert source_file in bind_mounts(service), f"{name}: {source_file} is not mounted"


# --- the mounted config against the services ---------------------------------------------------


def _configs_in_compose() -> list[str]:
    return [
        name for name in ENRICHER_SERVICES if option_value(command_of(SERVICES[name]), "--config")
    ]


@pytest.mark.parametrize("service", _configs_in_compose())
def test_mounted_config_is_valid(service: str) -> None:
    host_path, config = mounted_config(service)
    assert host_path == COMPOSE_CONFIG.resolve()
    assert config.enrichments, "the compose config enriches nothing"


def test_compose_config_broker_is_the_kafka_service() -> None:
    _, config = mounted_config(_configs_in_compose()[0])
    kafka = SERVICES["kafka"]
    env = compose_env(kafka)
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    listeners = _listeners(env["KAFKA_LISTENERS"])
    names = {"kafka", kafka.get("hostname", "kafka")}
    for url in config.kafka.broker:
        parts = urlsplit(url)
        assert parts.scheme == "kafka"
        assert parts.hostname in names, f"broker {url}: not the kafka service"
        matching = [n for n, addr in advertised.items() if addr == (parts.hostname, parts.port)]
        assert matching, f"broker {url}: kafka advertises only {advertised}"
        assert listeners[matching[0]][1] == parts.port, f"{matching[0]} listens on another port"
        assert matching[0] != env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert int(env.get("KAFKA_NUM_PARTITIONS", config.kafka.partitions)) == config.kafka.partitions


def test_compose_config_redis_is_the_redis_service() -> None:
    _, config = mounted_config(_configs_in_compose()[0])
    parts = urlsplit(config.redis.url)
    assert parts.scheme == "redis" and parts.hostname == "redis"
    port = option_value(command_of(SERVICES["redis"]), "--port") or "6379"
    assert (parts.port or 6379) == int(port)


def test_compose_config_apis_are_the_sandbox_service() -> None:
    _, config = mounted_config(_configs_in_compose()[0])
    port = int(option_value(command_of(SERVICES["sandbox-api"]), "--port") or 0)
    for name, api in config.apis.items():
        parts = urlsplit(api.url)
        assert parts.hostname == "sandbox-api", f"apis.{name}.url: not the sandbox-api service"
        assert parts.port == port, f"apis.{name}.url: port {parts.port}, sandbox-api --port {port}"


# --- the Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_installs_the_repo_and_runs_enricher() -> None:
    instructions = dockerfile_instructions()
    by_kind: dict[str, list[str]] = {}
    for kind, args in instructions:
        by_kind.setdefault(kind, []).append(args)
    assert any(args.split()[0] == "python:3.11-slim" for args in by_kind["FROM"])
    assert json.loads(by_kind["ENTRYPOINT"][-1]) == ["enricher"]
    copied = " ".join(by_kind["COPY"])
    assert "pyproject.toml" in copied and re.search(r"\benricher\b", copied)
    runs = " ".join(by_kind["RUN"])
    assert re.search(r"pip (install|wheel)\b[^&;]*\s\.(\s|$)", runs), "no pip install of the repo"
    assert "-e " not in runs and "--editable" not in runs, "the image needs a regular install"
    assert "[dev]" not in runs, "the image installs runtime dependencies only"
    assert by_kind.get("USER"), "the image runs as root"
    assert by_kind["USER"][-1].split(":")[0] not in ("root", "0")
    for service in ENRICHER_SERVICES:
        build = SERVICES[service]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (ROOT / context / dockerfile).resolve() == DOCKERFILE.resolve()


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    needed = ["pyproject.toml", "README.md"] + [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "enricher").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    for path in needed:
        assert not dockerignored(path, patterns), f".dockerignore leaves out {path}"
    for path in (".venv/bin/python", ".git/HEAD", "enricher/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(path, patterns), f".dockerignore lets {path} into the image"


# --- the example config and events -----------------------------------------------------------


def test_example_config_loads_and_targets_the_local_stack() -> None:
    config = load_config(EXAMPLE_CONFIG, env={})
    assert config.kafka.broker == ("kafka://127.0.0.1:9092",)
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    # A few seconds: the dev stack's Tansu broker makes joining workers wait on both.
    assert config.kafka.rebalance_timeout == 3.0
    assert config.kafka.session_timeout == 6.0
    geo = config.apis["geo"]
    assert (str(geo.rate), geo.burst, [str(q) for q in geo.quotas]) == ("50/s", 10, ["100000/day"])
    for index, rule in enumerate(config.enrichments):
        assert rule.api in config.apis, f"enrichments[{index}].api {rule.api!r} is not defined"
    for name, api in config.apis.items():
        parts = urlsplit(api.url)
        assert (parts.hostname, parts.port) == ("127.0.0.1", 8081), f"apis.{name}.url"
    by_into = {rule.into: rule for rule in config.enrichments}
    assert by_into["geo"].api == "geo" and dict(by_into["geo"].params) == {"ip": "client.ip"}
    assert by_into["risk"].api == "score"
    assert set(by_into["risk"].params) == {"user_id", "amount"}
    assert config.apis["score"].method == "POST"
    # The secret comes from the environment when set.
    with_key = load_config(EXAMPLE_CONFIG, env={"GEO_KEY": "k-123"})
    assert "k-123" in with_key.apis["geo"].headers.values()


@pytest.mark.parametrize("path", [EXAMPLE_CONFIG, COMPOSE_CONFIG], ids=lambda p: p.name)
def test_example_apis_are_sandbox_routes(path: Path) -> None:
    config = load_config(path, env={})
    for name, api in config.apis.items():
        route = (api.method, urlsplit(api.url).path)
        assert route in SANDBOX_ROUTES, f"apis.{name}: the sandbox API has no {route}"


def test_compose_config_matches_the_example_but_for_addresses() -> None:
    local = load_config(EXAMPLE_CONFIG, env={})
    compose = load_config(COMPOSE_CONFIG, env={})
    assert compose.enrichments == local.enrichments
    assert compose.topics == local.topics
    assert compose.app_id == local.app_id
    assert compose.unmatched == local.unmatched
    assert compose.apis.keys() == local.apis.keys()
    for name in local.apis:
        a, b = local.apis[name], compose.apis[name]
        assert urlsplit(a.url).path == urlsplit(b.url).path
        assert a.model_copy(update={"url": b.url}) == b, f"apis.{name} differs beyond its URL"
    # Production-like timeouts against a real Kafka broker.
    assert compose.kafka.session_timeout >= 10 and compose.kafka.rebalance_timeout >= 30


def test_sample_events_exercise_every_path() -> None:
    events = load_events()
    assert 30 <= len(events) <= 100
    config = load_config(EXAMPLE_CONFIG, env={})
    rules = [CompiledRule(rule) for rule in config.enrichments]
    outcomes: dict[str, int] = {}
    for event in events:
        matched = [rule for rule in rules if rule.matches(event)]
        if not matched:
            outcome = "unmatched"
        else:
            try:
                for rule in matched:
                    rule.request_params(event)
                outcome = "+".join(rule.into for rule in matched)
            except InvalidEvent:
                outcome = "invalid"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("geo", 0) >= 10, outcomes
    assert outcomes.get("risk", 0) >= 5, outcomes
    assert outcomes.get("unmatched", 0) >= 5, outcomes
    assert outcomes.get("invalid", 0) >= 1, outcomes
    assert {"page_view", "payment", "click"} <= {event.get("type") for event in events}
    assert all("user_id" in event for event in events), "the producer keys events by user_id"
