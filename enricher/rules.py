"""Enrichment rules: which events a rule matches, and the API parameters it takes from them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .config import Rule
from .errors import InvalidEvent

__all__ = ["MISSING", "CompiledRule", "get_path"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


_MAPPINGS = (dict, Mapping)  # dict first: JSON objects pass without an ABC check


def get_path(obj: Any, path: str) -> Any:
    """Follow a dotted path (``client.ip``, ``items.0.sku``) into JSON data; MISSING if absent."""
    node = obj
    for part in path.split("."):
        if isinstance(node, _MAPPINGS):
            if part not in node:
                return MISSING
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


class CompiledRule:
    """One ``enrichments`` entry, ready to test events against."""

    __slots__ = ("api", "into", "params", "select", "when")

    def __init__(self, rule: Rule) -> None:
        self.api = rule.api
        self.into = rule.into
        self.select = rule.select
        self.when: tuple[tuple[str, tuple[Any, ...]], ...] = tuple(rule.when.items())
        self.params: tuple[tuple[str, str], ...] = tuple(rule.params.items())

    def matches(self, event: Mapping[str, Any]) -> bool:
        """True when every ``when`` field is present and equals (one of) the listed values."""
        for field, allowed in self.when:
            if field not in event or event[field] not in allowed:
                return False
        return True

    def request_params(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The API parameters (JSON scalars) from the event; InvalidEvent when one is missing."""
        params: dict[str, Any] = {}
        for name, path in self.params:
            value = get_path(event, path)
            if value is MISSING or value is None:
                raise InvalidEvent(
                    f"param '{name}' of rule '{self.into}': no value at '{path}'", api=self.api
                )
            if isinstance(value, dict | list):
                raise InvalidEvent(
                    f"param '{name}' of rule '{self.into}': '{path}' is not a scalar",
                    api=self.api,
                )
            params[name] = value
        return params

    def pick(self, body: Any) -> Any:
        """The part of the API's answer this rule keeps (``select``), or the whole body."""
        if self.select is None:
            return body
        return get_path(body, self.select)
