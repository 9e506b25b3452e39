"""Log formats of the worker: Faust's text lines (default) or one JSON object per line.

``enricher worker --log-format json`` writes every record, ours and Faust's, as
``{"time": ISO-8601 UTC, "level", "logger", "message", ...}`` plus the record's extra fields
(``worker``, ``topic``, ``partition``, ``offset``, ``api``...) and, for an exception, its
``exc_type`` and traceback. Log lines never carry secrets: header values, URLs with their query
and third-party exception texts are kept out of messages where they are made (see ``errors``).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = ["LOG_FORMATS", "JsonFormatter", "LogFormat", "use_format"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")

# Attributes every LogRecord has: anything else was passed in ``extra``.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName", "color_message"}
)


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _strip_colors(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


def _strip_colors(text: str) -> str:
    """Faust colours some messages with ANSI escapes; a JSON line has no use for them."""
    if "\x1b[" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text.startswith("\x1b[", i):
            end = i + 2
            while end < len(text) and not text[end].isalpha():
                end += 1
            i = end + 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def use_format(log_format: LogFormat, logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (default: the root logger) the format's formatter."""
    if log_format != "json":
        return
    target = logger or logging.getLogger()
    for handler in target.handlers:
        handler.setFormatter(JsonFormatter())
