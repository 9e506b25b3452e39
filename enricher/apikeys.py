"""Client API keys of ``enricher ingest``: loaded from the config and/or a secrets file, compared
in constant time, never logged (only their SHA-256 digests are kept)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from .config import IngestSettings
from .errors import ConfigError

__all__ = ["ApiKeys", "load_api_keys", "presented_key"]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The accepted keys. Every check compares against all of them, so timing tells nothing."""

    __slots__ = ("_digests",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(key) for key in keys)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the keys (None or empty: never)."""
        digest = _digest(presented or "")
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(known, digest)
        return found and bool(presented)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY``, else ``X-Api-Key: KEY``."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("X-Api-Key") or None


def load_api_keys(settings: IngestSettings, base_dir: Path) -> ApiKeys:
    """``ingest.api_keys`` plus the lines of ``ingest.api_keys_file`` (relative to ``base_dir``;
    blank lines and ``#`` comments skipped). ConfigError when there is none or one is unusable."""
    keys = list(settings.api_keys)
    if settings.api_keys_file is not None:
        keys += _read_keys(base_dir / settings.api_keys_file)
    if any(not key or key != key.strip() or " " in key for key in keys):
        raise ConfigError("ingest.api_keys", "a key is empty or contains spaces")
    if not keys:
        raise ConfigError(
            "ingest.api_keys", "no client API keys: set ingest.api_keys or ingest.api_keys_file"
        )
    return ApiKeys(keys)


def _read_keys(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("ingest.api_keys_file", f"cannot read {path}: {reason}") from None
    stripped = (line.strip() for line in lines)
    return [line for line in stripped if line and not line.startswith("#")]
