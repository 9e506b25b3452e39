"""The event schemas of ``enricher ingest``: one JSON Schema (Draft 2020-12) per type and version.

Layout of the folder (``ingest.schemas``)::

    schemas/
      page_view/v1.json       type "page_view", schema_version 1
      page_view/v2.json
      click/v1.json

Every file is checked when the registry loads (valid JSON, a valid Draft 2020-12 schema, ``$ref``
only to places inside the same file) and compiled once; any problem is a
:class:`~enricher.errors.ConfigError` on ``ingest.schemas`` naming the file. An event is checked
against exactly the schema its own type and version name: an unknown type or version is a
rejection, never a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from .errors import ConfigError, RejectedEvent
from .rules import MISSING, get_path

__all__ = ["SchemaId", "SchemaRegistry"]

_KEY = "ingest.schemas"
_TYPE_RE = re.compile(r"[A-Za-z0-9._-]+")
_FILE_RE = re.compile(r"v([1-9][0-9]*)\.json")
_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_MAX_REASON = 300


@dataclass(frozen=True, slots=True, order=True)
class SchemaId:
    """One event type at one schema version."""

    type: str
    version: int

    def __str__(self) -> str:
        return f"{self.type}/v{self.version}"


class SchemaRegistry:
    """Compiled validators by type and version; :meth:`check` picks exactly one per event."""

    def __init__(
        self,
        validators: Mapping[SchemaId, Draft202012Validator],
        *,
        type_field: str = "type",
        version_field: str = "schema_version",
    ) -> None:
        self._validators = dict(validators)
        self._versions: dict[str, list[int]] = {}
        for schema_id in sorted(validators):
            self._versions.setdefault(schema_id.type, []).append(schema_id.version)
        self.type_field = type_field
        self.version_field = version_field

    @classmethod
    def load(
        cls, folder: Path, *, type_field: str = "type", version_field: str = "schema_version"
    ) -> SchemaRegistry:
        """Load and compile every ``<type>/v<N>.json`` in ``folder``; ConfigError if one is bad."""
        if not folder.is_dir():
            raise ConfigError(_KEY, f"{folder}: not a folder")
        validators = {schema_id: _compile(path) for schema_id, path in _schema_files(folder)}
        if not validators:
            raise ConfigError(_KEY, f"{folder}: no schema files (<type>/v<N>.json)")
        return cls(validators, type_field=type_field, version_field=version_field)

    @property
    def versions(self) -> dict[str, tuple[int, ...]]:
        """The schema versions of every type."""
        return {name: tuple(found) for name, found in self._versions.items()}

    def check(self, event: Mapping[str, Any]) -> SchemaId:
        """The event's own schema, once the event is valid against it; else RejectedEvent (422)."""
        schema_id = self._schema_of(event)
        try:
            error = best_match(self._validators[schema_id].iter_errors(event))
        except Unresolvable as exc:  # the load checks $refs; this is a last guard
            raise RejectedEvent(422, f"schema {schema_id} cannot be applied: {exc}") from None
        if error is not None:
            reason = _clip(f"invalid against {schema_id}: {error.json_path}: {error.message}")
            raise RejectedEvent(422, reason, path=error.json_path)
        return schema_id

    def _schema_of(self, event: Mapping[str, Any]) -> SchemaId:
        name = get_path(event, self.type_field)
        if name is MISSING:
            raise RejectedEvent(422, f"no {self.type_field!r} field naming the event type")
        if not isinstance(name, str):
            raise RejectedEvent(422, f"{self.type_field!r} must be a string, got {_short(name)}")
        known = self._versions.get(name)
        if known is None:
            raise RejectedEvent(422, _clip(f"unknown event type {name!r}"))
        version = get_path(event, self.version_field)
        if version is MISSING:
            raise RejectedEvent(422, f"no {self.version_field!r} field naming the schema version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise RejectedEvent(
                422, f"{self.version_field!r} must be an integer, got {_short(version)}"
            )
        if version not in known:
            listed = ", ".join(map(str, known))
            raise RejectedEvent(
                422, f"no schema for {name!r} version {version} (known versions: {listed})"
            )
        return SchemaId(name, version)


def _schema_files(folder: Path) -> Iterator[tuple[SchemaId, Path]]:
    for type_dir in sorted(folder.iterdir()):
        if type_dir.name.startswith("."):
            continue
        if not type_dir.is_dir() or not _TYPE_RE.fullmatch(type_dir.name):
            raise ConfigError(
                _KEY, f"{type_dir}: expected one folder per event type (letters, digits, '._-')"
            )
        for path in sorted(type_dir.iterdir()):
            if path.name.startswith("."):
                continue
            match = _FILE_RE.fullmatch(path.name)
            if match is None or not path.is_file():
                raise ConfigError(_KEY, f"{path}: expected a file named v<N>.json (v1.json, ...)")
            yield SchemaId(type_dir.name, int(match[1])), path


def _compile(path: Path) -> Draft202012Validator:
    """A validator for the schema file at ``path`` (formats checked); ConfigError naming it."""
    schema = _read(path)
    declared = schema.get("$schema", _DRAFT) if isinstance(schema, dict) else _DRAFT
    if declared.rstrip("#") != _DRAFT:
        raise ConfigError(_KEY, f"{path}: $schema must be {_DRAFT} (Draft 2020-12)")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ConfigError(
            _KEY, f"{path}: not a valid JSON Schema at {exc.json_path}: {_clip(exc.message)}"
        ) from None
    _check_refs(path, schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _read(path: Path) -> Any:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(_KEY, f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(_KEY, f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(schema, dict | bool):
        raise ConfigError(_KEY, f"{path}: expected a JSON object (a schema)")
    return schema


def _check_refs(path: Path, schema: Any) -> None:
    """Every ``$ref`` points inside this file (``#/$defs/...``) at something that exists."""
    uri = "urn:enricher:schema"
    resolver = Registry().with_resource(uri, DRAFT202012.create_resource(schema)).resolver(uri)
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise ConfigError(_KEY, f"{path}: $ref {ref!r}: only refs inside the file (#...)")
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise ConfigError(_KEY, f"{path}: $ref {ref!r} points to nothing") from None


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _short(value: Any) -> str:
    return _clip(json.dumps(value), 60)


def _clip(text: str, limit: int = _MAX_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
