"""Plain stand-ins for the settings objects, for unit tests that need no YAML.

One place to grow when ``config.RetrySettings`` or ``config.ApiSettings`` gains a field the code
reads; each test module fixes its own defaults with ``functools.partial``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FakeRetry:
    """What the retry policy reads of ``config.RetrySettings`` (``retry.RetryConfig``)."""

    attempts: int = 3
    backoff_min: float = 0.1
    backoff_max: float = 1.0
    on_status: tuple[int, ...] = (429, 500, 502, 503, 504)
    max_retry_after: float = 300.0
    deadline: float = 30.0
    budget: float = 0.2


@dataclass(frozen=True)
class FakeApi:
    """What the caller, the cache and the metrics read of ``config.ApiSettings``."""

    name: str
    url: str
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 2.0
    concurrency: int = 32
    retry: FakeRetry = FakeRetry()
    max_response_bytes: int = 4096
    cache_ttl: float = 0.0
    cache_not_found_ttl: float = 0.0
