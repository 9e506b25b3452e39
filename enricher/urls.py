"""Request URLs from a configured template and event values.

A template such as ``https://api.example/v1/geo/{ip}?lang={lang}&fields=all`` is parsed once
per API. Event values may only fill ``{name}`` placeholders in the path and in query *values*;
each value is percent-encoded whole (``quote(value, safe="")``), so no value can change the
scheme, host, port, the path's segments or the query's keys, whatever characters it holds
(``../``, ``?``, ``#``, ``@``, ``/``, CR/LF, a full URL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["UrlTemplate", "build_request_url", "param_to_str"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Characters a literal (config-written) part keeps as they are: already-encoded URL text.
_LITERAL_SAFE = "/:@!$&'()*+,;=-._~%?"
_DOT_SEGMENTS = frozenset({".", ".."})

# A parsed part: literal text, or the name of a placeholder (wrapped in a 1-tuple).
_Part = str | tuple[str]


def param_to_str(value: Any) -> str:
    """The text form of one JSON scalar parameter (``true``/``false`` for booleans).

    Raises ValueError for None and for anything that is not a string, number or boolean.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        raise ValueError("value is null")
    raise ValueError(f"value is a {type(value).__name__}, not a string, number or boolean")


def _parse_parts(text: str, where: str) -> tuple[_Part, ...]:
    """Split ``text`` into literal parts and placeholders; stray braces are an error."""
    pieces = _PLACEHOLDER.split(text)
    parts: list[_Part] = []
    for index, piece in enumerate(pieces):
        if index % 2:
            parts.append((piece,))
        elif piece:
            if "{" in piece or "}" in piece:
                raise ValueError(f"stray brace in the URL {where}: use {{name}} placeholders")
            parts.append(quote(piece, safe=_LITERAL_SAFE))
    return tuple(parts)


def _no_placeholder(text: str, where: str) -> str:
    if "{" in text or "}" in text:
        raise ValueError(f"placeholders are not allowed in the URL {where}")
    return text


class UrlTemplate:
    """A configured URL with ``{name}`` placeholders in its path and query values."""

    __slots__ = ("_origin", "_path", "_query", "_segments", "placeholders")

    def __init__(self, template: str) -> None:
        """Parse ``template``; ValueError when it is not an http(s) URL with a fixed origin."""
        split = urlsplit(template)
        if split.scheme not in ("http", "https") or not split.netloc:
            raise ValueError("URL must start with http:// or https:// and name a host")
        _no_placeholder(split.netloc, "host or port")
        _no_placeholder(split.fragment, "fragment")
        _ = split.port  # raises ValueError for a malformed port
        self._origin = f"{split.scheme}://{split.netloc}"
        self._path = _parse_parts(split.path or "/", "path")
        self._query = tuple(self._parse_query_item(item) for item in split.query.split("&") if item)
        names = [part[0] for part in self._path if isinstance(part, tuple)]
        for _, value_parts in self._query:
            names.extend(part[0] for part in value_parts if isinstance(part, tuple))
        self.placeholders: frozenset[str] = frozenset(names)
        # The template's own path segments, each placeholder standing in as "x".
        self._segments = _fill(self._path, dict.fromkeys(names, "x")).split("/")

    @staticmethod
    def _parse_query_item(item: str) -> tuple[str, tuple[_Part, ...]]:
        key, sep, value = item.partition("=")
        key = quote(_no_placeholder(key, "query keys"), safe=_LITERAL_SAFE)
        return key + sep, _parse_parts(value, "query")

    def render(self, params: Mapping[str, str]) -> str:
        """The URL with every placeholder filled by its percent-encoded value.

        Raises ValueError when a placeholder has no value, a path value is empty, or a path
        segment would become ``.`` or ``..`` (which servers treat as moving up the path).
        """
        missing = self.placeholders - params.keys()
        if missing:
            raise ValueError(f"no value for placeholder(s) {', '.join(sorted(missing))}")
        path = self._render_path(params)
        query = "&".join(key + _fill(parts, params) for key, parts in self._query)
        return f"{self._origin}{path}?{query}" if query else f"{self._origin}{path}"

    def _render_path(self, params: Mapping[str, str]) -> str:
        for part in self._path:
            if isinstance(part, tuple) and params[part[0]] == "":
                raise ValueError(f"empty value for path placeholder {part[0]}")
        path = _fill(self._path, params)
        for segment, original in zip(path.split("/"), self._segments, strict=True):
            if segment in _DOT_SEGMENTS and segment != original:
                raise ValueError("a path value would make a '.' or '..' segment")
        return path


def _fill(parts: tuple[_Part, ...], params: Mapping[str, str]) -> str:
    return "".join(
        quote(params[part[0]], safe="") if isinstance(part, tuple) else part for part in parts
    )


def build_request_url(template: str, params: Mapping[str, str]) -> str:
    """Parse ``template`` and fill it from ``params`` (see :class:`UrlTemplate`)."""
    return UrlTemplate(template).render(params)
