"""Replays: their ids and their shared state in Redis (the time window is in replay_scan).

A replay re-feeds old input records through the workers on the replay topic (``topics.replay``);
every re-fed record carries two headers, :data:`REPLAY_HEADER` (the replay id) and
:data:`ORIGIN_HEADER` (``topic/partition/offset`` of the original input record). Its state lives
in Redis, shared by the CLI that started it and the workers that process it:

    key                                  value                                     TTL
    enricher:{<app_id>}:replay:<id>      hash: id, state, kind, from, to, share,   7 days, renewed
                                         created_at, selected, refed, outputs,     by every update
                                         dead_letters, dropped, cancelled_events,
                                         note (and finished_at once done)
    enricher:{<app_id>}:replays          sorted set of ids, scored by creation     7 days, renewed

States: ``planning`` -> ``feeding`` (the CLI is writing the replay topic) -> ``running`` (fed;
workers are processing) -> ``done`` once outputs + dead_letters + dropped + cancelled_events
reach ``selected``. ``held`` (a quota share is spent; workers wait) may alternate with running;
``cancelled`` is final: workers stop calling APIs for it and count its events as cancelled.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, cast

import redis.asyncio as aioredis

from .errors import ServiceUnavailable
from .lanes import Lane
from .quota import REDIS_ERRORS, load_script, text
from .records import ORIGIN_HEADER, REPLAY_HEADER
from .replay_scan import Window

__all__ = [
    "ORIGIN_HEADER",
    "OUTCOMES",
    "REPLAY_HEADER",
    "REPLAY_TTL",
    "STATES",
    "Outcome",
    "Replay",
    "ReplayRegistry",
    "new_replay_id",
]

REPLAY_TTL: Final = 7 * 86_400  # seconds
STATES: Final = ("planning", "feeding", "running", "done", "cancelled", "held")
OUTCOMES: Final = ("outputs", "dead_letters", "dropped", "cancelled_events")
Outcome = Literal["outputs", "dead_letters", "dropped", "cancelled_events"]
Kind = Literal["replay", "redrive"]
CACHE_SECONDS: Final = 0.2  # how stale is_cancelled() may be


def new_replay_id(now: datetime | None = None) -> str:
    """``r20250131T123456-3f9a2c``: sortable by creation time, unique by its random suffix."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"r{moment:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class Replay:
    """A snapshot of one replay's hash."""

    id: str
    state: str
    kind: str
    start: datetime
    end: datetime
    share: float
    created_at: datetime
    selected: int = 0
    refed: int = 0
    outputs: int = 0
    dead_letters: int = 0
    dropped: int = 0
    cancelled_events: int = 0
    note: str = ""

    @property
    def finished(self) -> int:
        """Re-fed events with an outcome (output, dead letter, dropped or cancelled)."""
        return self.outputs + self.dead_letters + self.dropped + self.cancelled_events

    @property
    def active(self) -> bool:
        return self.state in ("planning", "feeding", "running", "held")

    @classmethod
    def from_hash(cls, fields: Mapping[Any, Any]) -> Replay:
        data = {text(k): text(v) for k, v in fields.items()}
        counts = {name: int(data.get(name) or 0) for name in ("selected", "refed", *OUTCOMES)}
        return cls(
            id=data["id"],
            state=data.get("state", "planning"),
            kind=data.get("kind", "replay"),
            start=datetime.fromisoformat(data["from"]),
            end=datetime.fromisoformat(data["to"]),
            share=float(data["share"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            note=data.get("note", ""),
            **counts,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``from``/``to``/``created_at`` in ISO-8601 UTC)."""
        return {
            "id": self.id,
            "state": self.state,
            "kind": self.kind,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "share": self.share,
            "created_at": self.created_at.isoformat(),
            "selected": self.selected,
            "refed": self.refed,
            **{name: getattr(self, name) for name in OUTCOMES},
            "finished": self.finished,
            "note": self.note,
        }


def _replay_script(name: str) -> str:
    """The text of ``lua/<name>`` after ``lua/replay_complete.lua``, whose ``complete()`` it calls
    (a replay is done when its outcomes reach ``selected`` while running or held)."""
    return load_script("replay_complete.lua") + load_script(name)


_RECORD_OUTCOME: Final = _replay_script("replay_outcome.lua")
_TRANSITION: Final = _replay_script("replay_transition.lua")


@dataclass(slots=True)
class _Seen:
    checked_at: float
    state: str | None  # None: no such replay (expired, or never created)
    share: float | None  # None: not known (Redis unreachable before the first answer)


class ReplayRegistry:
    """Every replay of one app in Redis; cheap cached reads for the workers' per-event checks."""

    def __init__(
        self,
        redis: aioredis.Redis,
        app_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._prefix = f"enricher:{{{app_id}}}:"
        self._clock = clock
        self._seen: dict[str, _Seen] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._record = redis.register_script(_RECORD_OUTCOME)
        self._transition = redis.register_script(_TRANSITION)

    def key(self, replay_id: str) -> str:
        return f"{self._prefix}replay:{replay_id}"

    @property
    def index_key(self) -> str:
        return f"{self._prefix}replays"

    async def create(
        self,
        *,
        window: Window,
        share: float,
        kind: Kind = "replay",
        selected: int = 0,
        note: str = "",
        now: datetime | None = None,
    ) -> Replay:
        """A new replay in state ``planning``."""
        Lane("check", share)  # raises ValueError outside (0, 1]
        created = (now or datetime.now(UTC)).astimezone(UTC)
        replay = Replay(
            new_replay_id(created), "planning", kind, window.start, window.end, share, created
        )
        fields = replay.as_dict()
        del fields["finished"]
        fields.update(selected=selected, note=note)
        key = self.key(replay.id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(key, REPLAY_TTL)
        pipe.zadd(self.index_key, {replay.id: created.timestamp()})
        pipe.expire(self.index_key, REPLAY_TTL)
        await self._run(pipe.execute())
        return Replay.from_hash(fields)

    async def get(self, replay_id: str) -> Replay | None:
        """The replay's current state, None when unknown (or expired)."""
        fields = await self._run(self._redis.hgetall(self.key(replay_id)))
        return Replay.from_hash(fields) if fields else None

    async def list(self, limit: int = 20) -> list[Replay]:
        """The most recent replays first; expired ones are pruned from the index."""
        oldest = time.time() - REPLAY_TTL
        await self._run(self._redis.zremrangebyscore(self.index_key, "-inf", oldest))
        ids = [
            text(i) for i in await self._run(self._redis.zrevrange(self.index_key, 0, limit - 1))
        ]
        pipe = self._redis.pipeline(transaction=False)
        for replay_id in ids:
            pipe.hgetall(self.key(replay_id))
        found = await self._run(pipe.execute())
        gone = [replay_id for replay_id, fields in zip(ids, found, strict=True) if not fields]
        if gone:
            await self._run(self._redis.zrem(self.index_key, *gone))
        return [Replay.from_hash(fields) for fields in found if fields]

    async def set_state(
        self,
        replay_id: str,
        state: str,
        *,
        note: str | None = None,
        from_states: Iterable[str] = STATES,
    ) -> str | None:
        """Move to ``state`` (and set ``note``; None keeps it) if the replay is in one of
        ``from_states``; returns the state it is in afterwards (None: no such replay). Running or
        held with every outcome in means done."""
        if state not in STATES:
            raise ValueError(f"unknown replay state {state!r}")
        keep = note is None
        args: list[str | int] = [
            REPLAY_TTL,
            state,
            " ".join(from_states),
            note or "",
            "0" if keep else "1",
        ]
        result = await self._run(self._transition(keys=[self.key(replay_id)], args=args))
        return None if result is None else text(result)

    async def cancel(self, replay_id: str, *, note: str | None = None) -> str | None:
        """Cancel an active replay; returns its state afterwards (None: no such replay)."""
        active = ("planning", "feeding", "running", "held")
        return await self.set_state(replay_id, "cancelled", note=note, from_states=active)

    async def finish_feeding(self, replay_id: str, selected: int) -> str | None:
        """Every selected record is on the replay topic: fix ``selected``, go ``running``."""
        await self._update(replay_id, "selected", str(selected))
        return await self.set_state(replay_id, "running", from_states=("planning", "feeding"))

    async def add_refed(self, replay_id: str, count: int) -> None:
        """``count`` more records were written to the replay topic."""
        key = self.key(replay_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, "refed", count)
        pipe.expire(key, REPLAY_TTL)
        await self._run(pipe.execute())

    async def record_outcome(self, replay_id: str, kind: Outcome, count: int = 1) -> int:
        """Workers: one replayed event ended as ``kind``. Returns the outcomes total so far
        (-1: no such replay). The last outcome of a running replay marks it done."""
        if kind not in OUTCOMES:
            raise ValueError(f"unknown replay outcome {kind!r}")
        args = [REPLAY_TTL, kind, count]
        return int(await self._run(self._record(keys=[self.key(replay_id)], args=args)))

    async def is_cancelled(self, replay_id: str) -> bool:
        """Workers, per event: should this replay stop calling APIs? At most ``CACHE_SECONDS``
        stale; an unknown (expired) replay counts as cancelled; Redis errors keep the last
        answer."""
        seen = await self._cached(replay_id)
        return seen.state in (None, "cancelled")

    async def lane(self, replay_id: str) -> Lane | None:
        """The replay's lane (its share), cached like :meth:`is_cancelled`; None when unknown
        (no such replay, or Redis unreachable so far: use the config's ``replay_share`` then)."""
        seen = await self._cached(replay_id)
        return None if seen.state is None or seen.share is None else Lane(replay_id, seen.share)

    async def _cached(self, replay_id: str) -> _Seen:
        seen = self._seen.get(replay_id)
        if seen is not None and self._fresh(seen):
            return seen
        lock = self._locks.setdefault(replay_id, asyncio.Lock())
        async with lock:  # one refresh per replay at a time; the others reuse its answer
            seen = self._seen.get(replay_id)
            if seen is not None and self._fresh(seen):
                return seen
            try:
                state, share = await self._redis.hmget(self.key(replay_id), ["state", "share"])
            except REDIS_ERRORS:
                last = seen or _Seen(0.0, "running", None)
                seen = _Seen(self._clock(), last.state, last.share)
            else:
                known = state is not None and share is not None
                seen = _Seen(
                    self._clock(),
                    text(state) if known else None,
                    float(text(share)) if known else None,
                )
            self._seen[replay_id] = seen
            return seen

    def _fresh(self, seen: _Seen) -> bool:
        final = seen.state in (None, "cancelled")  # cancelling is for good
        return final or self._clock() - seen.checked_at < CACHE_SECONDS

    async def _update(self, replay_id: str, field: str, value: str) -> None:
        key = self.key(replay_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, field, value)
        pipe.expire(key, REPLAY_TTL)
        await self._run(pipe.execute())

    @staticmethod
    async def _run(awaitable: Any) -> Any:
        try:
            return await cast(Any, awaitable)
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("redis", str(exc)) from exc
