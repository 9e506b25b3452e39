"""The schema registry of ``enricher ingest``: the folder layout checked at load (errors name the
file), and each event validated against exactly its own type and version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from enricher.errors import ConfigError, RejectedEvent
from enricher.schemas import SchemaId, SchemaRegistry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "schemas"
OBJECT = {"type": "object", "required": ["user_id"]}


def write(folder: Path, files: dict[str, Any]) -> Path:
    """Write ``{"type/v1.json": schema or raw text}`` under ``folder``."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def test_the_example_schemas_load() -> None:
    registry = SchemaRegistry.load(EXAMPLES)
    assert registry.versions == {"click": (1,), "page_view": (1, 2), "payment": (1,)}


@pytest.mark.parametrize(
    ("files", "bad", "says"),
    [
        ({"page_view/v1.json": "{oops"}, "page_view/v1.json", "invalid JSON at line 1"),
        ({"page_view/v1.json": "[1]"}, "page_view/v1.json", "expected a JSON object"),
        ({"page_view/V1.json": OBJECT}, "page_view/V1.json", "v<N>.json"),
        ({"page_view/v01.json": OBJECT}, "page_view/v01.json", "v<N>.json"),
        ({"page_view/v1.yaml": OBJECT}, "page_view/v1.yaml", "v<N>.json"),
        ({"page_view/v1.json/x": OBJECT}, "page_view/v1.json", "v<N>.json"),
        ({"v1.json": OBJECT}, "v1.json", "one folder per event type"),
        ({"page view/v1.json": OBJECT}, "page view", "one folder per event type"),
        (
            {"page_view/v2.json": {"type": "object", "required": "user_id"}},
            "page_view/v2.json",
            "not a valid JSON Schema at $.required",
        ),
        (
            {"a/v1.json": {"$schema": "http://json-schema.org/draft-07/schema#"}},
            "a/v1.json",
            "Draft 2020-12",
        ),
        ({"a/v1.json": {"$ref": "https://example.com/s.json"}}, "a/v1.json", "inside the file"),
        (
            {"a/v1.json": {"properties": {"x": {"$ref": "#/$defs/nope"}}}},
            "a/v1.json",
            "points to nothing",
        ),
    ],
)
def test_a_bad_file_is_a_config_error_naming_it(
    tmp_path: Path, files: dict[str, Any], bad: str, says: str
) -> None:
    folder = write(tmp_path / "schemas", {"ok/v1.json": OBJECT, **files})
    with pytest.raises(ConfigError) as info:
        SchemaRegistry.load(folder)
    assert info.value.key == "ingest.schemas"
    assert str(folder / bad) in info.value.message and says in info.value.message


def test_an_empty_or_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".git").mkdir(parents=True)  # dot entries are skipped
    with pytest.raises(ConfigError, match="no schema files"):
        SchemaRegistry.load(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a folder"):
        SchemaRegistry.load(tmp_path / "missing")


def test_refs_inside_the_file_work(tmp_path: Path) -> None:
    folder = write(
        tmp_path,
        {
            "m/v1.json": {
                "properties": {"n": {"$ref": "#/$defs/positive"}},
                "$defs": {"positive": {"type": "integer", "minimum": 1}},
            }
        },
    )
    registry = SchemaRegistry.load(folder)
    assert registry.check({"type": "m", "schema_version": 1, "n": 3}) == SchemaId("m", 1)
    with pytest.raises(RejectedEvent) as info:
        registry.check({"type": "m", "schema_version": 1, "n": 0})
    assert info.value.path == "$.n"


def v1(**fields: Any) -> dict[str, Any]:
    event = {"type": "page_view", "schema_version": 1, "user_id": "u", "url": "/"}
    return {**event, "client": {"ip": "1.2.3.4"}, **fields}


def v2(**fields: Any) -> dict[str, Any]:
    event = {"type": "page_view", "schema_version": 2, "user_id": "u", "page": {"url": "/"}}
    return {**event, "client": {"ip": "1.2.3.4", "user_agent": "x"}, **fields}


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load(EXAMPLES)


def test_each_version_is_checked_against_its_own_schema(registry: SchemaRegistry) -> None:
    assert registry.check(v1()) == SchemaId("page_view", 1)
    assert registry.check(v2()) == SchemaId("page_view", 2)
    assert str(registry.check(v2(client={"ip": "::1", "user_agent": "x"}))) == "page_view/v2"
    # a valid v2 body that says version 1 is not guessed into v2
    with pytest.raises(RejectedEvent) as info:
        registry.check({**v2(), "schema_version": 1})
    assert "page_view/v1" in info.value.reason and info.value.code == 422


@pytest.mark.parametrize(
    ("event", "reason", "path"),
    [
        (v1(client={"ip": "1.2.3.999"}), "page_view/v1: $.client.ip: '1.2.3.999' is not a", None),
        (v1(user_id=""), "page_view/v1: $.user_id:", None),
        (v2(page={}), "page_view/v2: $.page: 'url' is a required property", "$.page"),
        (v1(schema_version=7), "no schema for 'page_view' version 7 (known versions: 1, 2)", None),
        (v1(schema_version="1"), "'schema_version' must be an integer, got \"1\"", None),
        (v1(schema_version=True), "'schema_version' must be an integer, got true", None),
        (v1(schema_version=1.5), "'schema_version' must be an integer, got 1.5", None),
        (v1(type="scroll"), "unknown event type 'scroll'", None),
        (v1(type=["page_view"]), "'type' must be a string", None),
        ({"schema_version": 1}, "no 'type' field naming the event type", None),
        ({"type": "click"}, "no 'schema_version' field naming the schema version", None),
    ],
)
def test_rejections_say_why(
    registry: SchemaRegistry, event: dict[str, Any], reason: str, path: str | None
) -> None:
    with pytest.raises(RejectedEvent) as info:
        registry.check(event)
    assert reason in info.value.reason and info.value.code == 422
    if path is not None:
        assert info.value.path == path


def test_type_and_version_fields_are_configurable(tmp_path: Path) -> None:
    folder = write(tmp_path, {"order/v3.json": OBJECT})
    registry = SchemaRegistry.load(folder, type_field="meta.kind", version_field="meta.v")
    assert registry.check({"meta": {"kind": "order", "v": 3}, "user_id": 1}) == SchemaId("order", 3)
    with pytest.raises(RejectedEvent, match=r"'meta\.kind'"):
        registry.check({"type": "order", "schema_version": 3})


def test_long_reasons_are_clipped(registry: SchemaRegistry) -> None:
    with pytest.raises(RejectedEvent) as info:
        registry.check(v1(user_id=["x" * 5000]))
    assert len(info.value.reason) <= 300 and info.value.path == "$.user_id"
