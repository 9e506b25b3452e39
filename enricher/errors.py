"""Every error enricher raises, in one place.

    EnricherError
    ├── ConfigError            bad config file or option; names the key path (CLI exit 2)
    │   └── BadArgument        a bad command-line argument; names the argument
    ├── ServiceUnavailable     Redis or Kafka cannot be reached (CLI exit 1)
    ├── ShuttingDown           the worker is stopping; a wait was cancelled, nothing was called
    ├── RefusedBatch           `enricher ingest` refuses a whole request (400, 401, 413)
    ├── RejectedEvent          `enricher ingest` rejects one event of a batch (413, 422)
    └── EventError             one event cannot be enriched: it becomes a dead letter
        ├── InvalidEvent       "invalid_event": bad JSON, not an object, too large, param missing
        └── CallError          kinds "http_status", "timeout", "connection", "bad_response"

Third-party exceptions (aiohttp, redis, aiokafka) are translated into these where they enter, so
callers act on ``kind``, ``retriable`` and ``retry_after`` rather than on library types. Messages
never contain request URLs with their query, headers or other secrets.
"""

from __future__ import annotations

from typing import Any, Literal

ErrorKind = Literal["invalid_event", "http_status", "timeout", "connection", "bad_response"]

__all__ = [
    "BadArgument",
    "CallError",
    "ConfigError",
    "EnricherError",
    "ErrorKind",
    "EventError",
    "InvalidEvent",
    "RefusedBatch",
    "RejectedEvent",
    "ServiceUnavailable",
    "ShuttingDown",
]


class EnricherError(Exception):
    """Base of every enricher error."""


class ConfigError(EnricherError):
    """The config (file or command-line override) is invalid.

    ``key`` is the dotted path of the offending key (``apis.geo.rate``), or ``""`` for the file.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class BadArgument(ConfigError):
    """A command-line argument is invalid (``key`` names it: ``--rate``, ``API``)."""


class ServiceUnavailable(EnricherError):
    """A backing service (Redis, the Kafka broker) cannot be reached."""

    def __init__(self, service: str, message: str) -> None:
        self.service = service
        super().__init__(f"{service} unavailable: {message}")


class ShuttingDown(EnricherError):
    """The worker is stopping: a limiter wait was cancelled before any call was made."""


class RefusedBatch(EnricherError):
    """A whole ingestion request is refused (``code``: 400 bad body, 401 key, 413 too large)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class RejectedEvent(EnricherError):
    """One event of an ingestion batch is rejected; the rest of the batch goes on.

    ``code`` is its status in the answer (413 too large, 422 invalid); ``path`` is the JSON path
    (``$.client.ip``) of the schema error, if any.
    """

    def __init__(self, code: int, reason: str, *, path: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.path = path
        super().__init__(reason)


class EventError(EnricherError):
    """One event cannot be enriched; it is written to the dead-letter topic with these details."""

    kind: ErrorKind = "invalid_event"
    retriable: bool = False

    def __init__(
        self,
        message: str,
        *,
        api: str | None = None,
        status: int | None = None,
        attempts: int = 0,
    ) -> None:
        self.message = message
        self.api = api
        self.status = status
        self.attempts = attempts
        super().__init__(message)

    def as_dict(self) -> dict[str, Any]:
        """The ``error`` object of a dead-letter record (contract section 3)."""
        return {
            "kind": self.kind,
            "message": self.message,
            "api": self.api,
            "status": self.status,
            "attempts": self.attempts,
        }


class InvalidEvent(EventError):
    """The input record itself is unusable (bad JSON, not an object, too large, param missing)."""

    kind: ErrorKind = "invalid_event"


class CallError(EventError):
    """An API call failed.

    ``retriable`` says whether another attempt may succeed (timeouts, connection errors and the
    configured statuses); ``retry_after`` is the server's ``Retry-After`` in seconds, if sent;
    ``retry_stopped`` names the limit that refused a further attempt (``"deadline"`` or
    ``"budget"``), if one did.
    """

    retry_stopped: str | None = None

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        api: str | None = None,
        status: int | None = None,
        attempts: int = 0,
        retriable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, api=api, status=status, attempts=attempts)
        self.kind = kind
        self.retriable = retriable
        self.retry_after = retry_after
