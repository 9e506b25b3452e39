"""The config file: frozen pydantic models, loading, and the effective config for check-config.

Loading: ``${VAR}`` / ``${VAR:-default}`` are expanded in the raw text (full-line comments are left
alone; ``$${`` writes a literal ``${``), the YAML is parsed safely (a key repeated in one mapping
is an error) and the models validate it. Every model rejects unknown keys; values written in human
units (``2s``, ``50/s``, ``100000/day``, ``100ms..10s``, ``1MiB``) are parsed by
:mod:`enricher.units`.
Every failure is a :class:`~enricher.errors.ConfigError` naming the dotted key path
(``apis.geo.retry.attempts``, ``enrichments[0].api``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Hashable, Mapping
from functools import partial
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from enricher import units
from enricher.errors import ConfigError
from enricher.units import QuotaPeriod
from enricher.urls import UrlTemplate

__all__ = [
    "ApiSettings",
    "CircuitSettings",
    "Config",
    "IngestRoute",
    "IngestSettings",
    "KafkaSecurity",
    "KafkaSettings",
    "Quota",
    "QuotaPeriod",
    "Rate",
    "RedisSettings",
    "RetrySettings",
    "Rule",
    "ServingSettings",
    "TopicSettings",
    "WorkerSettings",
    "config_from_dict",
    "expand_env",
    "load_config",
    "load_config_or_default_path",
    "mask_url",
    "parse_config",
    "render_effective",
]

_MODEL = ConfigDict(frozen=True, extra="forbid")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")


class _Invalid(ValueError):
    """A validation failure at ``key``, a dotted path below the object being validated."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _as_tuple(value: Any) -> Any:
    """A YAML scalar where a list is expected means a list of one."""
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _not_bool(value: Any) -> Any:
    """YAML reads yes/no/true/false as booleans; they are not numbers here."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


def _name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"may only contain letters, digits, '.', '_' and '-', got {value!r}")
    return value


def _topic(value: str) -> str:
    if not _TOPIC_RE.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"not a valid Kafka topic name (letters, digits, '.', '_', '-'): {value!r}"
        )
    return value


def _dotted(value: str) -> str:
    if not value or "" in value.split("."):
        raise ValueError(f"expected a dotted path like client.ip, got {value!r}")
    return value


def _url_template(value: str) -> str:
    parts = urlsplit(value)
    if "@" in parts.netloc:
        raise ValueError("credentials in the URL are not allowed: send them in headers")
    UrlTemplate(value)  # raises ValueError for a bad scheme, host or placeholder position
    if not parts.hostname:
        raise ValueError("the URL has no host")
    return value


Duration = Annotated[float, BeforeValidator(units.parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(units.parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(units.parse_size), Field(ge=1)]
Share = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, le=1)]
Positive = Annotated[int, BeforeValidator(_not_bool), Field(ge=1)]
Text = Annotated[str, Field(min_length=1)]
Name = Annotated[str, AfterValidator(_name)]
Topic = Annotated[str, AfterValidator(_topic)]
DottedPath = Annotated[str, AfterValidator(_dotted)]
HttpStatus = Annotated[int, BeforeValidator(_not_bool), Field(ge=100, le=599)]


class Rate(BaseModel):
    """Token-bucket refill: ``count`` calls per ``per`` seconds (``"50/s"``, ``"3000/m"``)."""

    model_config = _MODEL
    count: Positive
    per: Annotated[float, Field(gt=0)]

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            count, per = units.parse_rate(data)
            return {"count": count, "per": per}
        return data

    @property
    def per_second(self) -> float:
        """Calls per second."""
        return self.count / self.per

    def __str__(self) -> str:
        return units.format_rate(self.count, self.per)


class Quota(BaseModel):
    """A hard cap per UTC calendar period (``"100000/day"``)."""

    model_config = _MODEL
    limit: Positive
    period: QuotaPeriod

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            limit, period = units.parse_quota(data)
            return {"limit": limit, "period": period}
        return data

    def __str__(self) -> str:
        return units.format_quota(self.limit, self.period)


class KafkaSecurity(BaseModel):
    """How every Kafka client connects: ``PLAINTEXT``, ``SSL`` (TLS, optionally with a client
    certificate) or ``SASL_SSL`` (a SASL login inside TLS). A SASL password is never sent in
    clear: ``SASL_PLAINTEXT`` and credentials without TLS are refused."""

    model_config = _MODEL
    protocol: Literal["PLAINTEXT", "SSL", "SASL_SSL"] = "PLAINTEXT"
    cafile: Text | None = None  # CA bundle that verifies the broker; None: the system's CAs
    certfile: Text | None = None  # client certificate (mutual TLS), PEM; may hold the key too
    keyfile: Text | None = None
    check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    username: Text | None = None
    password: Text | None = None

    @field_validator("protocol", mode="before")
    @classmethod
    def _refuse_clear_sasl(cls, value: Any) -> Any:
        if isinstance(value, str) and value.upper() == "SASL_PLAINTEXT":
            raise ValueError("SASL_PLAINTEXT would send the SASL password in clear; use SASL_SSL")
        return value.upper() if isinstance(value, str) else value

    @field_validator("cafile", "certfile", "keyfile")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"file not found or not readable: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        sasl = {"sasl_mechanism": self.sasl_mechanism, "username": self.username}
        sasl["password"] = self.password
        if self.protocol == "SASL_SSL":
            for key in ("username", "password"):
                if sasl[key] is None:
                    raise _Invalid(key, "required with protocol SASL_SSL")
        else:
            for key, value in sasl.items():
                if value is not None:
                    why = "would be sent in clear" if self.protocol == "PLAINTEXT" else "unused"
                    raise _Invalid(key, f"a SASL setting ({why}): set protocol: SASL_SSL")
        if self.protocol == "PLAINTEXT":
            for key in ("cafile", "certfile", "keyfile"):
                if getattr(self, key) is not None:
                    raise _Invalid(key, "a TLS option: set protocol: SSL or SASL_SSL")
        if self.keyfile is not None and self.certfile is None:
            raise _Invalid("keyfile", "needs certfile (the client certificate)")
        return self

    @property
    def mechanism(self) -> str:
        """The SASL mechanism in use (``PLAIN`` unless set)."""
        return self.sasl_mechanism or "PLAIN"


class KafkaSettings(BaseModel):
    """The broker, and what the app passes to Faust."""

    model_config = _MODEL
    broker: Annotated[tuple[Text, ...], BeforeValidator(_as_tuple), Field(min_length=1)] = (
        "kafka://127.0.0.1:9092",
    )
    partitions: Positive = 8
    rebalance_timeout: PositiveDuration = 60.0
    session_timeout: PositiveDuration = 60.0
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)


class RedisSettings(BaseModel):
    """The Redis shared by all workers, and what to do when it is unreachable."""

    model_config = _MODEL
    url: str = "redis://127.0.0.1:6379/0"
    on_unavailable: Literal["pause", "local"] = "pause"
    local_share: Share = 0.25

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"expected a redis://, rediss:// or unix:// URL, got scheme {scheme!r}"
            )
        return value


class TopicSettings(BaseModel):
    """Kafka topic names; all four must differ."""

    model_config = _MODEL
    input: Topic = "events"
    output: Topic = "events.enriched"
    dead_letter: Topic = "events.dlq"
    replay: Topic = "events.replay"

    @model_validator(mode="after")
    def _distinct(self) -> TopicSettings:
        seen: dict[str, str] = {}
        for key, topic in self.model_dump().items():
            if topic in seen:
                raise _Invalid(key, f"the same topic as topics.{seen[topic]} ({topic!r})")
            seen[topic] = key
        return self


class WorkerSettings(BaseModel):
    """One worker process."""

    model_config = _MODEL
    in_flight: Positive = 256
    web_host: Text = "127.0.0.1"
    web_port: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=65535)] = 0
    max_event_bytes: Size = 1_048_576


_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class ServingSettings(BaseModel):
    """Serving the latest enrichment per key (``GET /enrichments/{key}``, :mod:`enricher.serving`).

    ``store``: ``off`` (nothing stored, no endpoint), ``table`` (a Faust table partitioned like the
    input, changelog topic ``<app_id>-<table>-changelog``, requests forwarded to the key's owner)
    or ``redis`` (``redis.url``, entries expire ``redis_ttl`` after their last update).
    ``advertised_host``: how other workers reach this one's web port in table mode (default
    ``worker.web_host``; required when that is a wildcard address)."""

    model_config = _MODEL
    store: Literal["off", "table", "redis"] = "off"
    table: Name = "enrichments"
    redis_ttl: PositiveDuration = 7 * 86400.0
    advertised_host: Text | None = None


class RetrySettings(BaseModel):
    """Retries of one API call; ``backoff: 100ms..10s`` in YAML sets backoff_min and backoff_max."""

    model_config = _MODEL
    attempts: Positive = 5
    backoff_min: Duration = 0.1
    backoff_max: Duration = 10.0
    on_status: Annotated[tuple[HttpStatus, ...], BeforeValidator(_as_tuple)] = (
        *(429, 500, 502, 503, 504),
    )
    max_retry_after: PositiveDuration = 300.0
    # the event's time for requests and retry waits (limiter and quota holds do not count)
    deadline: PositiveDuration = 30.0
    # retries per first attempt this worker may make to the API over ~10 s (plus a small floor)
    budget: Annotated[float, BeforeValidator(_not_bool), Field(ge=0)] = 0.2

    @model_validator(mode="before")
    @classmethod
    def _split_backoff(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "backoff" not in data:
            return data
        data = dict(data)
        text = data.pop("backoff")
        if "backoff_min" in data or "backoff_max" in data:
            raise _Invalid("backoff", "give either backoff or backoff_min/backoff_max, not both")
        try:
            data["backoff_min"], data["backoff_max"] = units.parse_backoff(text)
        except ValueError as exc:
            raise _Invalid("backoff", str(exc)) from None
        return data

    @model_validator(mode="after")
    def _ordered(self) -> RetrySettings:
        if self.backoff_min > self.backoff_max:
            raise _Invalid("backoff", "the backoff minimum exceeds the maximum")
        return self


class CircuitSettings(BaseModel):
    """The API's circuit breaker: ``failures`` consecutive failed attempts (timeouts, connection
    errors, 5xx) open it for ``cool_down``; ``failures: 0`` turns it off."""

    model_config = _MODEL
    failures: Annotated[int, BeforeValidator(_not_bool), Field(ge=0)] = 5
    cool_down: PositiveDuration = 10.0


class ApiSettings(BaseModel):
    """One third-party API: where and how to call it, and the limits it imposes."""

    model_config = _MODEL
    name: Name
    url: Annotated[str, AfterValidator(_url_template)]
    method: Literal["GET", "POST"] = "GET"
    headers: dict[Text, str] = Field(default_factory=dict)
    timeout: PositiveDuration = 2.0
    rate: Rate
    burst: Positive
    quotas: Annotated[tuple[Quota, ...], BeforeValidator(_as_tuple)] = ()
    concurrency: Positive = 32
    retry: RetrySettings = Field(default_factory=RetrySettings)
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)
    cache_ttl: Duration = 0.0
    cache_not_found_ttl: Duration = 0.0  # for 404/410 answers; 0 = not cached
    replay_share: Share = 0.5
    max_response_bytes: Size = 1_048_576

    @model_validator(mode="before")
    @classmethod
    def _default_burst(cls, data: Any) -> Any:
        """``burst`` defaults to one second's worth of ``rate``, at least 1."""
        if not isinstance(data, dict) or data.get("burst") is not None:
            return data
        data = {key: value for key, value in data.items() if key != "burst"}
        try:
            rate = Rate.model_validate(data.get("rate"))
        except (ValidationError, ValueError):
            return {**data, "burst": 1}  # the rate field reports the problem
        return {**data, "burst": max(1, math.ceil(round(rate.per_second, 9)))}

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("headers", mode="before")
    @classmethod
    def _header_text(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        plain = (int, float)
        return {
            k: str(v) if isinstance(v, plain) and not isinstance(v, bool) else v
            for k, v in value.items()
        }

    @field_validator("headers")
    @classmethod
    def _no_line_breaks(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if any(c in key + text for c in "\r\n\0") or ":" in key:
                raise _Invalid(key, "no line breaks in headers, and no ':' in header names")
        return value

    @field_validator("quotas")
    @classmethod
    def _one_per_period(cls, value: tuple[Quota, ...]) -> tuple[Quota, ...]:
        periods = [quota.period for quota in value]
        for index, period in enumerate(periods):
            if period in periods[:index]:
                raise _Invalid(f"[{index}]", f"a second quota per {period}")
        return value

    @property
    def placeholders(self) -> frozenset[str]:
        """The ``{name}`` placeholders of the URL template."""
        return UrlTemplate(self.url).placeholders


class Rule(BaseModel):
    """One ``enrichments`` entry: which events, which API, which params, where the answer goes."""

    model_config = _MODEL
    when: dict[Text, tuple[Any, ...]] = Field(default_factory=dict)
    api: Text
    params: dict[Text, DottedPath] = Field(default_factory=dict)
    into: Text
    select: DottedPath | None = None

    @field_validator("when", mode="before")
    @classmethod
    def _any_of(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for key, allowed in value.items():
            if isinstance(allowed, list) and not allowed:
                raise _Invalid(str(key), "an empty list matches no event")
        return {key: _as_tuple(allowed) for key, allowed in value.items()}


class IngestRoute(BaseModel):
    """Where ``enricher ingest`` publishes one event type: its topic and the field keying it."""

    model_config = _MODEL
    topic: Topic | None = None  # None: topics.input
    key_field: DottedPath | None = None  # None: ingest.key_field


class IngestSettings(BaseModel):
    """``enricher ingest``: the HTTP endpoint taking batches of events (see the README)."""

    model_config = _MODEL
    host: Text = "127.0.0.1"
    port: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=65535)] = 0
    schemas: Text = "schemas"  # folder of <type>/v<N>.json, relative to the config file
    type_field: DottedPath = "type"
    version_field: DottedPath = "schema_version"
    key_field: DottedPath = "user_id"
    routes: dict[Name, IngestRoute] = Field(default_factory=dict)
    api_keys: Annotated[tuple[Text, ...], BeforeValidator(_as_tuple)] = ()
    api_keys_file: Text | None = None  # one key per line, relative to the config file
    max_batch_events: Positive = 1000
    max_batch_bytes: Size = 5_242_880
    max_event_bytes: Size | None = None  # None: worker.max_event_bytes
    ack_timeout: PositiveDuration = 10.0

    @model_validator(mode="after")
    def _event_fits_batch(self) -> IngestSettings:
        if self.max_event_bytes is not None and self.max_event_bytes > self.max_batch_bytes:
            raise _Invalid("max_event_bytes", "exceeds max_batch_bytes")
        return self


class Config(BaseModel):
    """The whole config file."""

    model_config = _MODEL
    app_id: Name = "enricher"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    apis: dict[str, ApiSettings] = Field(default_factory=dict)
    enrichments: tuple[Rule, ...] = ()
    unmatched: Literal["passthrough", "drop", "dead_letter"] = "passthrough"
    ingest: IngestSettings = Field(default_factory=IngestSettings)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """A section left empty in YAML (``apis:``, every entry commented out) is its default."""
        sections = (
            "kafka",
            "redis",
            "topics",
            "worker",
            "serving",
            "apis",
            "enrichments",
            "ingest",
        )
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (k in sections and v is None)}
        return data

    @field_validator("apis", mode="before")
    @classmethod
    def _names_from_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        named = {}
        for key, api in value.items():
            if not isinstance(key, str) or not _NAME_RE.fullmatch(key):
                raise _Invalid(
                    str(key), "API names may only contain letters, digits, '.', '_', '-'"
                )
            if isinstance(api, dict) and api.get("name", key) != key:
                raise _Invalid(f"{key}.name", f"differs from the API's key {key!r}; leave it out")
            named[key] = {**api, "name": key} if isinstance(api, dict) else api
        return named

    @model_validator(mode="after")
    def _rules_match_apis(self) -> Config:
        seen_into: dict[str, int] = {}
        for index, rule in enumerate(self.enrichments):
            at = f"enrichments[{index}]"
            api = self.apis.get(rule.api)
            if api is None:
                known = ", ".join(sorted(self.apis)) or "none"
                raise _Invalid(f"{at}.api", f"unknown API {rule.api!r} (defined: {known})")
            missing = sorted(api.placeholders - rule.params.keys())
            if missing:
                raise _Invalid(
                    f"{at}.params", f"no param for {', '.join(missing)} of API {api.name!r}"
                )
            extra = sorted(rule.params.keys() - api.placeholders)
            if extra and api.method == "GET":
                raise _Invalid(
                    f"{at}.params", f"{', '.join(extra)}: not a placeholder of {api.url}"
                )
            if rule.into in seen_into:
                raise _Invalid(
                    f"{at}.into", f"{rule.into!r} is used by enrichments[{seen_into[rule.into]}]"
                )
            seen_into[rule.into] = index
        return self

    @model_validator(mode="after")
    def _ingest_fits_workers(self) -> Config:
        ingest, topics = self.ingest, self.topics
        if (ingest.max_event_bytes or 0) > self.worker.max_event_bytes:
            raise _Invalid(
                "ingest.max_event_bytes",
                "exceeds worker.max_event_bytes: workers would dead-letter such events",
            )
        written_by_workers = {topics.output, topics.dead_letter, topics.replay}
        for name, route in ingest.routes.items():
            if route.topic in written_by_workers:
                raise _Invalid(
                    f"ingest.routes.{name}.topic",
                    f"{route.topic!r} is a topic the workers write; route events to an input topic",
                )
        return self

    @model_validator(mode="after")
    def _reachable_for_forwarding(self) -> Config:
        serving, host = self.serving, self.worker.web_host
        if serving.store == "table" and serving.advertised_host is None and host in _WILDCARD_HOSTS:
            raise _Invalid(
                "serving.advertised_host",
                f"required with serving.store: table and worker.web_host {host!r} "
                "(other workers forward requests to it)",
            )
        return self


# --- errors ------------------------------------------------------------------------------------

_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "string_too_short": "must not be empty",
    "too_short": "must not be empty",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
}


def _key_path(loc: tuple[int | str, ...], below: str = "") -> str:
    path = ""
    for part in (*loc, *below.split(".")):
        if part in ("", "[key]"):
            continue
        if isinstance(part, int) or part.startswith("["):
            path += f"[{part}]" if isinstance(part, int) else part
        else:
            path += f".{part}" if path else part
    return path


def _short(value: object) -> str:
    """A bad scalar as written; only the type of a mapping or list (it may hold secrets)."""
    if not isinstance(value, str | int | float | bool | None):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(error: ErrorDetails, secret: bool) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    got = "" if secret else f", got {_short(error['input'])}"
    if kind == "value_error":
        return str(ctx["error"])
    if kind in ("extra_forbidden", "missing"):
        return _MESSAGES[kind]
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {bound}{got}"
    text = _MESSAGES.get(kind) or error["msg"][:1].lower() + error["msg"][1:]
    return text + got


def _config_error(exc: ValidationError) -> ConfigError:
    """The first failure of ``exc`` as a ConfigError; never shows headers or Redis settings."""
    errors = exc.errors()
    first = errors[0]
    cause = first.get("ctx", {}).get("error")
    key = _key_path(first["loc"], cause.key if isinstance(cause, _Invalid) else "")
    secret = "headers" in first["loc"] or first["loc"][:1] == ("redis",)
    secret = secret or "api_keys" in first["loc"] or first["loc"][:2] == ("kafka", "security")
    more = len(errors) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return ConfigError(key, _message(first, secret) + suffix)


# --- loading -----------------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, env: Mapping[str, str], *, source: str = "<string>") -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` (default when unset or empty) from ``env``.

    Full-line comments are left as they are; ``$${VAR}`` stands for a literal ``${VAR}``.
    """
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if not line.lstrip().startswith("#"):
            lines[number - 1] = _VAR_RE.sub(
                partial(_variable, env=env, at=f"{source}, line {number}"), line
            )
    return "".join(lines)


def _variable(match: re.Match[str], *, env: Mapping[str, str], at: str) -> str:
    escaped, name, default = match.groups()
    if escaped:
        return match[0][1:]
    value = env.get(name)
    if default is not None and not value:
        return default
    if value is None:
        raise ConfigError(
            "",
            f"{at}: environment variable {name} is not set "
            f"(write ${{{name}:-default}} to give a default)",
        )
    return value


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, rejecting a key repeated in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("", f"{source}{where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source}: invalid YAML: {exc}") from None


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Validate already-parsed data (no env expansion); ConfigError on any problem."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"expected a mapping of settings, got {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise _config_error(exc) from None


def parse_config(
    text: str, *, env: Mapping[str, str] | None = None, source: str = "<string>"
) -> Config:
    """Expand environment variables in ``text``, parse it as YAML and validate it."""
    expanded = expand_env(text, os.environ if env is None else env, source=source)
    data = _load_yaml(expanded, source)
    return config_from_dict({} if data is None else data)


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at ``path``."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {source}: {exc}") from None
    return parse_config(text, env=env, source=source)


def load_config_or_default_path(
    path: str | None, *, env: Mapping[str, str] | None = None
) -> Config:
    """Load ``--config PATH``; without one, ``$ENRICHER_CONFIG``, else ``./enricher.yaml``."""
    environ = os.environ if env is None else env
    return load_config(path or environ.get("ENRICHER_CONFIG") or "./enricher.yaml", env=environ)


# --- the effective config --------------------------------------------------------------------

_MASK = "***"


def mask_url(url: str) -> str:
    """``url`` with its password (``user:PASSWORD@`` or ``?password=``) replaced by ``***``."""
    head, question, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    userinfo, at, host = urlsplit(url).netloc.rpartition("@")
    if at and ":" in userinfo:
        masked_netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{host}"
        head = head.replace(f"{userinfo}@{host}", masked_netloc, 1)
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key.lower() == "password" for key, _ in pairs):
        masked = [(k, _MASK if k.lower() == "password" else v) for k, v in pairs]
        query = urlencode(masked, safe="*")
    return f"{head}{question}{query}{hash_}{fragment}"


def render_effective(config: Config) -> str:
    """The config after defaults as YAML, itself a valid config file; secrets shown as ``***``."""
    data = _effective(config)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _effective(config: Config) -> dict[str, Any]:
    kafka, worker = config.kafka, config.worker
    return {
        "app_id": config.app_id,
        "kafka": {
            "broker": kafka.broker[0] if len(kafka.broker) == 1 else list(kafka.broker),
            "partitions": kafka.partitions,
            "rebalance_timeout": units.format_duration(kafka.rebalance_timeout),
            "session_timeout": units.format_duration(kafka.session_timeout),
            "auto_offset_reset": kafka.auto_offset_reset,
            **_effective_security(kafka.security),
        },
        "redis": {**config.redis.model_dump(), "url": mask_url(config.redis.url)},
        "topics": config.topics.model_dump(),
        "worker": {
            **worker.model_dump(),
            "max_event_bytes": units.format_size(worker.max_event_bytes),
        },
        "serving": {
            **config.serving.model_dump(),
            "redis_ttl": units.format_duration(config.serving.redis_ttl),
        },
        "apis": {name: _effective_api(api) for name, api in config.apis.items()},
        "enrichments": [_effective_rule(rule) for rule in config.enrichments],
        "unmatched": config.unmatched,
        "ingest": _effective_ingest(config.ingest),
    }


def _effective_ingest(ingest: IngestSettings) -> dict[str, Any]:
    routes = {
        name: {k: v for k, v in route.model_dump().items() if v is not None}
        for name, route in ingest.routes.items()
    }
    return {
        **ingest.model_dump(),
        "routes": routes,
        "api_keys": [_MASK] * len(ingest.api_keys),
        "max_batch_bytes": units.format_size(ingest.max_batch_bytes),
        "max_event_bytes": ingest.max_event_bytes and units.format_size(ingest.max_event_bytes),
        "ack_timeout": units.format_duration(ingest.ack_timeout),
    }


def _effective_security(security: KafkaSecurity) -> dict[str, Any]:
    """``{"security": ...}`` with the password masked; nothing for plain connections."""
    if security.protocol == "PLAINTEXT":
        return {}
    shown = security.model_dump(exclude_none=True)
    if security.protocol == "SASL_SSL":
        shown["sasl_mechanism"] = security.mechanism
    if security.password is not None:
        shown["password"] = _MASK
    return {"security": shown}


def _effective_api(api: ApiSettings) -> dict[str, Any]:
    retry = api.retry
    return {
        "url": api.url,
        "method": api.method,
        "headers": dict.fromkeys(api.headers, _MASK),
        "timeout": units.format_duration(api.timeout),
        "rate": str(api.rate),
        "burst": api.burst,
        "quotas": [str(quota) for quota in api.quotas],
        "concurrency": api.concurrency,
        "retry": {
            "attempts": retry.attempts,
            "backoff": units.format_backoff(retry.backoff_min, retry.backoff_max),
            "on_status": list(retry.on_status),
            "max_retry_after": units.format_duration(retry.max_retry_after),
            "deadline": units.format_duration(retry.deadline),
            "budget": retry.budget,
        },
        "circuit": {
            "failures": api.circuit.failures,
            "cool_down": units.format_duration(api.circuit.cool_down),
        },
        "cache_ttl": units.format_duration(api.cache_ttl),
        "cache_not_found_ttl": units.format_duration(api.cache_not_found_ttl),
        "replay_share": api.replay_share,
        "max_response_bytes": units.format_size(api.max_response_bytes),
    }


def _effective_rule(rule: Rule) -> dict[str, Any]:
    when = {
        key: allowed[0] if len(allowed) == 1 and not isinstance(allowed[0], list) else list(allowed)
        for key, allowed in rule.when.items()
    }
    return {
        "when": when,
        "api": rule.api,
        "params": dict(rule.params),
        "into": rule.into,
        "select": rule.select,
    }
