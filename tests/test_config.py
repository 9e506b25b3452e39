"""Config loading: the contract's example, env expansion, key-path errors, cross-checks, masking."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from enricher.config import (
    ApiSettings,
    CircuitSettings,
    Config,
    Rate,
    config_from_dict,
    expand_env,
    load_config,
    load_config_or_default_path,
    mask_url,
    parse_config,
    render_effective,
)
from enricher.errors import ConfigError

# The example of CONTRACT.md section 2, verbatim.
CONTRACT_EXAMPLE = """\
app_id: enricher                       # Faust app id = consumer group; also the Redis key namespace
kafka:
  broker: kafka://127.0.0.1:9092       # one URL or a list
  partitions: 8                        # for topics the app creates
  rebalance_timeout: 60s               # passed to Faust (tests and the dev stack use a few seconds:
  session_timeout: 60s                 #   a Tansu broker makes a joining worker wait on both)
redis:
  url: redis://127.0.0.1:6379/0        # rediss:// for TLS
  on_unavailable: pause                # pause: no call without a Redis token | local: each worker falls
  local_share: 0.25                    #   back to an in-process aiolimiter at rate x local_share
topics:
  input: events                        # source events: JSON objects
  output: events.enriched
  dead_letter: events.dlq
  replay: events.replay                # internal, used by `enricher replay`
worker:
  in_flight: 256                       # events being enriched at once per worker (all partitions)
  web_host: 127.0.0.1                  # the worker's HTTP port (health, metrics, views) binds here;
  web_port: 0                          #   0 = a free port; `--web-port` overrides
apis:
  geo:
    url: http://127.0.0.1:8081/geo/{ip}   # {name} placeholders filled from `params`, percent-encoded
    method: GET                        # GET or POST (POST sends the params as a JSON body)
    headers: {X-Api-Key: "${GEO_KEY}"} # values may come from the environment; never logged
    timeout: 2s                        # per attempt
    rate: 50/s                         # token bucket refill: N/s, N/m or N/h, shared by all workers
    burst: 10                          # bucket size (default: one second's worth, at least 1)
    quotas: [100000/day]               # hard caps per UTC calendar period: minute, hour, day, month
    concurrency: 32                    # calls in flight per worker to this API
    retry:
      attempts: 5                      # total attempts, first one included
      backoff: 100ms..10s              # exponential with jitter, between these bounds
      on_status: [429, 500, 502, 503, 504]   # plus timeouts and connection errors
    cache_ttl: 1h                      # reuse a response for the same request for this long (0 = off)
    replay_share: 0.5                  # default share of rate and quota a replay may use
enrichments:
  - when: {type: page_view}            # all listed top-level fields must equal (a list = any of)
    api: geo
    params: {ip: client.ip}            # placeholder -> dotted path into the event
    into: geo                          # result lands at event["enrichment"]["geo"]
    select: null                       # optional dotted path into the response body to keep
unmatched: passthrough                 # events no rule matches: passthrough | drop | dead_letter
"""  # noqa: E501

SECRET = "s3cr3t-K3y-value"


def api_yaml(extra: str = "", url: str = "http://api.test/geo/{ip}") -> str:
    """A config with one API ``geo`` (extra lines indented under it) and no rules."""
    lines = textwrap.indent(textwrap.dedent(extra).strip() + "\n", "    ") if extra else ""
    return f"apis:\n  geo:\n    url: '{url}'\n    rate: 5/s\n{lines}"


def config_error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env or {})
    return info.value


def test_contract_example_parses_with_every_value() -> None:
    config = parse_config(CONTRACT_EXAMPLE, env={"GEO_KEY": SECRET})

    assert config.app_id == "enricher"
    assert config.kafka.broker == ("kafka://127.0.0.1:9092",)
    assert (config.kafka.partitions, config.kafka.auto_offset_reset) == (8, "earliest")
    assert (config.kafka.rebalance_timeout, config.kafka.session_timeout) == (60.0, 60.0)
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    assert (config.redis.on_unavailable, config.redis.local_share) == ("pause", 0.25)
    topics = config.topics
    assert (topics.input, topics.output) == ("events", "events.enriched")
    assert (topics.dead_letter, topics.replay) == ("events.dlq", "events.replay")
    assert (config.worker.in_flight, config.worker.web_host, config.worker.web_port) == (
        256,
        "127.0.0.1",
        0,
    )
    assert config.worker.max_event_bytes == 1_048_576
    geo = config.apis["geo"]
    assert (geo.name, geo.url, geo.method) == ("geo", "http://127.0.0.1:8081/geo/{ip}", "GET")
    assert geo.headers == {"X-Api-Key": SECRET}
    assert geo.timeout == 2.0
    assert (geo.rate.count, geo.rate.per, geo.rate.per_second) == (50, 1.0, 50.0)
    assert geo.burst == 10
    assert [(q.limit, q.period) for q in geo.quotas] == [(100000, "day")]
    assert geo.concurrency == 32
    assert geo.retry.attempts == 5
    assert (geo.retry.backoff_min, geo.retry.backoff_max) == (0.1, 10.0)
    assert geo.retry.on_status == (429, 500, 502, 503, 504)
    assert geo.retry.max_retry_after == 300.0
    assert (geo.cache_ttl, geo.replay_share, geo.max_response_bytes) == (3600.0, 0.5, 1_048_576)
    assert geo.placeholders == frozenset({"ip"})
    (rule,) = config.enrichments
    assert rule.when == {"type": ("page_view",)}
    assert (rule.api, rule.params, rule.into, rule.select) == (
        "geo",
        {"ip": "client.ip"},
        "geo",
        None,
    )
    assert config.unmatched == "passthrough"


def test_empty_config_is_all_defaults() -> None:
    assert parse_config("", env={}) == Config()
    assert parse_config("apis:\nenrichments:\n", env={}) == Config()


@pytest.mark.parametrize(
    ("rate", "burst"), [("50/s", 50), ("3000/m", 50), ("100/h", 1), ("5/2s", 3)]
)
def test_burst_defaults_to_one_second_of_rate(rate: str, burst: int) -> None:
    config = parse_config(api_yaml().replace("5/s", rate), env={})
    assert config.apis["geo"].burst == burst


def test_list_and_scalar_forms() -> None:
    text = api_yaml("quotas: 10/hour\nretry: {on_status: 429}") + textwrap.dedent("""\
        kafka: {broker: [kafka://a:9092, kafka://b:9092]}
        enrichments:
          - {when: {type: [a, b], n: 1}, api: geo, params: {ip: ip}, into: g}
        """)
    config = parse_config(text, env={})
    assert config.kafka.broker == ("kafka://a:9092", "kafka://b:9092")
    assert [str(q) for q in config.apis["geo"].quotas] == ["10/hour"]
    assert config.apis["geo"].retry.on_status == (429,)
    assert config.enrichments[0].when == {"type": ("a", "b"), "n": (1,)}


# --- environment ---------------------------------------------------------------------------------


def test_env_expansion_with_and_without_defaults() -> None:
    text = "app_id: ${APP}\nworker: {web_host: '${HOST:-0.0.0.0}', web_port: ${PORT:-9000}}\n"
    config = parse_config(text, env={"APP": "shop", "PORT": "7000"})
    assert (config.app_id, config.worker.web_host, config.worker.web_port) == (
        "shop",
        "0.0.0.0",
        7000,
    )
    assert expand_env("${A:-d}", {"A": ""}) == "d"  # as in the shell: empty takes the default
    assert expand_env("${A}", {"A": ""}) == ""
    assert expand_env("x: $${A}", {}) == "x: ${A}"
    assert expand_env("# uses ${UNSET}\nx: 1\n", {}) == "# uses ${UNSET}\nx: 1\n"


def test_unset_variable_names_variable_and_line() -> None:
    error = config_error("app_id: x\n\nredis: {url: '${REDIS_URL}'}\n")
    assert error.key == ""
    assert "REDIS_URL" in error.message
    assert "line 3" in error.message


def test_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICHER_TEST_APP", "from-env")
    assert parse_config("app_id: ${ENRICHER_TEST_APP}").app_id == "from-env"


# --- errors name the key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("apiss: {}", "apiss"),
        ("kafka: {brokers: x}", "kafka.brokers"),
        (api_yaml("retry: {atempts: 3}"), "apis.geo.retry.atempts"),
        (api_yaml("ratee: 5/s"), "apis.geo.ratee"),
        (
            api_yaml() + "enrichments: [{api: geo, params: {ip: ip}, into: g, intoo: h}]",
            "enrichments[0].intoo",
        ),
    ],
)
def test_unknown_keys_are_named(text: str, key: str) -> None:
    error = config_error(text)
    assert (error.key, error.message) == (key, "unknown key")
    assert str(error) == f"{key}: unknown key"


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            api_yaml().replace("5/s", "50 per s"),
            "apis.geo.rate",
            "expected N/s, N/m or N/h, got '50 per s'",
        ),
        (api_yaml("timeout: 2x"), "apis.geo.timeout", "duration"),
        (api_yaml("timeout: 0"), "apis.geo.timeout", "> 0"),
        (api_yaml("quotas: [5/week]"), "apis.geo.quotas[0]", "N/day"),
        (api_yaml("quotas: [5/day, 9/d]"), "apis.geo.quotas[1]", "second quota per day"),
        (api_yaml("retry: {backoff: 10s..1s}"), "apis.geo.retry.backoff", "exceeds"),
        (api_yaml("retry: {backoff: soon}"), "apis.geo.retry.backoff", "MIN..MAX"),
        (api_yaml("retry: {attempts: 0}"), "apis.geo.retry.attempts", ">= 1"),
        (api_yaml("retry: {on_status: [99]}"), "apis.geo.retry.on_status[0]", ">= 100"),
        (api_yaml("cache_not_found_ttl: -1"), "apis.geo.cache_not_found_ttl", ">= 0"),
        (api_yaml("cache_not_found_ttl: soon"), "apis.geo.cache_not_found_ttl", "duration"),
        (api_yaml("replay_share: 0"), "apis.geo.replay_share", "> 0"),
        (api_yaml("replay_share: 1.5"), "apis.geo.replay_share", "<= 1"),
        (api_yaml("concurrency: many"), "apis.geo.concurrency", "expected an integer"),
        (api_yaml("method: PUT"), "apis.geo.method", "'GET' or 'POST'"),
        (api_yaml("name: other"), "apis.geo.name", "differs"),
        (api_yaml("max_response_bytes: 1XB"), "apis.geo.max_response_bytes", "size"),
        ("apis: {geo: {url: 'http://a.test/'}}", "apis.geo.rate", "missing"),
        ("apis: {'geo api': {url: 'http://a.test/', rate: 1/s}}", "apis.geo api", "letters"),
        ("redis: {local_share: 0}", "redis.local_share", "> 0"),
        ("redis: {on_unavailable: open}", "redis.on_unavailable", "'pause' or 'local'"),
        ("kafka: {partitions: true}", "kafka.partitions", "expected a number"),
        ("kafka: {broker: []}", "kafka.broker", "empty"),
        ("worker: {in_flight: 0}", "worker.in_flight", ">= 1"),
        ("worker: {web_port: 70000}", "worker.web_port", "<= 65535"),
        ("topics: {output: events}", "topics.output", "same topic as topics.input"),
        ("topics: {input: 'bad topic'}", "topics.input", "Kafka topic"),
        ("app_id: 'a{b}'", "app_id", "letters"),
        ("app_id: ''", "app_id", "letters"),
        ("unmatched: keep", "unmatched", "'passthrough', 'drop' or 'dead_letter'"),
    ],
)
def test_bad_values_name_the_key(text: str, key: str, words: str) -> None:
    error = config_error(text)
    assert error.key == key
    assert words in error.message
    assert "pydantic" not in str(error) and "validation error" not in str(error)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://{host}/x", "host"),
        ("http://api.test:{port}/x", "host or port"),
        ("{scheme}://api.test/x", "http"),
        ("ftp://api.test/x", "http"),
        ("http:///x", "host"),
        ("http://api.test/x?{name}=1", "query keys"),
        ("http://api.test/x#{frag}", "fragment"),
        ("http://api.test/x/{ip", "brace"),
        ("http://user:pw@api.test/x", "credentials"),
    ],
)
def test_bad_urls_are_rejected(url: str, words: str) -> None:
    error = config_error(api_yaml(url=url))
    assert error.key == "apis.geo.url"
    assert words in error.message


def test_placeholders_in_path_and_query_values() -> None:
    config = parse_config(api_yaml(url="https://api.test/v1/{ip}/x?lang={lang}&f=all"), env={})
    assert config.apis["geo"].placeholders == frozenset({"ip", "lang"})


def test_duplicate_yaml_keys_are_rejected() -> None:
    error = config_error("app_id: a\napp_id: b\n")
    assert "duplicate key 'app_id'" in error.message
    assert "line 2" in error.message


@pytest.mark.parametrize("text", ["[1, 2]", "app_id: [", "just text"])
def test_not_a_mapping_or_bad_yaml(text: str) -> None:
    assert config_error(text).key == ""


# --- cross-checks --------------------------------------------------------------------------------


def rules(*lines: str) -> str:
    return "enrichments:\n" + "".join(f"  - {line}\n" for line in lines)


def test_rule_api_must_exist() -> None:
    error = config_error(api_yaml() + rules("{api: geo2, params: {ip: ip}, into: g}"))
    assert error.key == "enrichments[0].api"
    assert "unknown API" in error.message and "geo" in error.message


def test_rule_must_fill_every_placeholder() -> None:
    error = config_error(
        api_yaml() + rules("{api: geo, params: {ip: ip}, into: a}", "{api: geo, into: b}")
    )
    assert error.key == "enrichments[1].params"
    assert "ip" in error.message


def test_get_rejects_params_without_placeholder_post_sends_them() -> None:
    rule = rules("{api: geo, params: {ip: ip, lang: user.lang}, into: g}")
    error = config_error(api_yaml() + rule)
    assert (error.key, "lang" in error.message) == ("enrichments[0].params", True)
    config = parse_config(api_yaml("method: post") + rule, env={})
    assert config.apis["geo"].method == "POST"
    assert config.enrichments[0].params == {"ip": "ip", "lang": "user.lang"}


def test_into_must_be_unique() -> None:
    error = config_error(
        api_yaml()
        + rules("{api: geo, params: {ip: a}, into: g}", "{api: geo, params: {ip: b}, into: g}")
    )
    assert error.key == "enrichments[1].into"


def test_rule_paths_must_be_dotted_paths() -> None:
    assert config_error(api_yaml() + rules("{api: geo, params: {ip: a..b}, into: g}")).key == (
        "enrichments[0].params.ip"
    )
    assert config_error(
        api_yaml() + rules("{api: geo, params: {ip: a}, into: g, select: ''}")
    ).key == ("enrichments[0].select")
    assert config_error(
        api_yaml() + rules("{when: {t: []}, api: geo, params: {ip: a}, into: g}")
    ).key == ("enrichments[0].when.t")


# --- masking and the effective config ------------------------------------------------------------

SECRET_CONFIG = api_yaml(
    "headers: {X-Api-Key: '${GEO_KEY}', Authorization: 'Bearer ${GEO_KEY}'}"
) + ("redis: {url: 'rediss://user:${REDIS_PW}@redis.test:6380/1'}\n")
SECRET_ENV = {"GEO_KEY": SECRET, "REDIS_PW": "pw-" + SECRET}


def test_render_effective_masks_every_secret() -> None:
    config = parse_config(SECRET_CONFIG, env=SECRET_ENV)
    assert config.apis["geo"].headers["X-Api-Key"] == SECRET
    rendered = render_effective(config)
    assert SECRET not in rendered and "s3cr3t" not in rendered
    reparsed = parse_config(rendered, env={})
    assert reparsed.apis["geo"].headers == {"X-Api-Key": "***", "Authorization": "***"}
    assert reparsed.redis.url == "rediss://user:***@redis.test:6380/1"


def test_cache_not_found_ttl_defaults_to_off_and_is_rendered() -> None:
    assert parse_config(api_yaml(), env={}).apis["geo"].cache_not_found_ttl == 0.0
    config = parse_config(api_yaml("cache_ttl: 1h\ncache_not_found_ttl: 10m"), env={})
    geo = config.apis["geo"]
    assert (geo.cache_ttl, geo.cache_not_found_ttl) == (3600.0, 600.0)
    rendered = render_effective(config)
    assert "cache_not_found_ttl: 10m" in rendered
    assert parse_config(rendered, env={}) == config


def test_render_effective_round_trips() -> None:
    text = api_yaml(
        "quotas: [10/minute, 1000/month]\ntimeout: 250ms\nretry: {backoff: 1s..1m}"
    ) + textwrap.dedent("""\
        kafka: {broker: [kafka://a:1, kafka://b:2], rebalance_timeout: 5s}
        worker: {max_event_bytes: 512KB}
        enrichments:
          - {when: {type: [a, b], n: 1}, api: geo, params: {ip: ip}, into: g, select: a.b}
        unmatched: dead_letter
        """)
    config = parse_config(text, env={})
    rendered = render_effective(config)
    assert parse_config(rendered, env={}) == config
    assert "timeout: 250ms" in rendered and "rate: 5/s" in rendered
    assert "backoff: 1s..1m" in rendered and "10/minute" in rendered
    contract = parse_config(CONTRACT_EXAMPLE, env={"GEO_KEY": "***"})
    assert parse_config(render_effective(contract), env={}) == contract


def test_secrets_do_not_leak_into_errors() -> None:
    for text in (
        api_yaml(f"headers: {{X-Api-Key: [{SECRET}]}}"),
        f"redis: 'redis://:{SECRET}@h'",
        f"redis: {{url: 'http://:{SECRET}@h'}}",
    ):
        assert SECRET not in str(config_error(text))


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:pw@h/0", "rediss://user:***@h/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///tmp/r.sock?db=1&password=pw", "unix:///tmp/r.sock?db=1&password=***"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_models_are_frozen() -> None:
    config = parse_config(CONTRACT_EXAMPLE, env={"GEO_KEY": "k"})
    with pytest.raises(ValidationError):
        config.app_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.apis["geo"].burst = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.apis["geo"].rate.count = 1  # type: ignore[misc]


def test_models_accept_their_own_dump() -> None:
    config = parse_config(CONTRACT_EXAMPLE, env={"GEO_KEY": "k"})
    assert config_from_dict(config.model_dump()) == config
    assert Rate.model_validate("3000/m") == Rate(count=3000, per=60.0)
    assert str(Rate(count=3000, per=60.0)) == "3000/m"
    api = ApiSettings(name="x", url="http://a.test/{q}", rate=Rate(count=1, per=1.0), burst=1)
    assert api.placeholders == frozenset({"q"})


# --- files ---------------------------------------------------------------------------------------


def test_load_config_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "enricher.yaml"
    path.write_text("app_id: from-file\n", encoding="utf-8")
    assert load_config(path, env={}).app_id == "from-file"
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml", env={})


def test_default_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config_or_default_path(None, env={})
    assert (info.value.key, info.value.message) == ("", "config file not found: ./enricher.yaml")
    (tmp_path / "enricher.yaml").write_text("app_id: cwd\n", encoding="utf-8")
    (tmp_path / "other.yaml").write_text("app_id: env\n", encoding="utf-8")
    (tmp_path / "explicit.yaml").write_text("app_id: explicit\n", encoding="utf-8")
    assert load_config_or_default_path(None, env={}).app_id == "cwd"
    env = {"ENRICHER_CONFIG": str(tmp_path / "other.yaml")}
    assert load_config_or_default_path(None, env=env).app_id == "env"
    assert load_config_or_default_path("explicit.yaml", env=env).app_id == "explicit"


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("circuit: {failures: -1}", "apis.geo.circuit.failures", ">= 0"),
        ("circuit: {failures: yes}", "apis.geo.circuit.failures", "expected a number"),
        ("circuit: {cool_down: 0}", "apis.geo.circuit.cool_down", "> 0"),
        ("circuit: {cool_down: soon}", "apis.geo.circuit.cool_down", "duration"),
        ("circuit: {failure: 3}", "apis.geo.circuit.failure", "unknown key"),
    ],
)
def test_circuit_settings_are_validated(text: str, key: str, words: str) -> None:
    error = config_error(api_yaml(text))
    assert error.key == key and words in error.message


def test_circuit_defaults_and_rendering() -> None:
    geo = parse_config(api_yaml(), env={}).apis["geo"]
    assert geo.circuit == CircuitSettings(failures=5, cool_down=10.0)
    config = parse_config(api_yaml("circuit: {failures: 0, cool_down: 300ms}"), env={})
    assert config.apis["geo"].circuit == CircuitSettings(failures=0, cool_down=0.3)
    rendered = render_effective(config)
    assert "    circuit:\n      failures: 0\n      cool_down: 300ms\n" in rendered
    assert parse_config(rendered, env={}) == config
