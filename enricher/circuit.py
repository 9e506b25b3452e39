"""Circuit breakers, one per API, shared by every worker through Redis.

    closed ── `failures` failed attempts in a row ──▶ open ── cool_down ──▶ half-open
      ▲                                                 ▲                       │ one worker
      │                                                 └─── the probe fails ───┤ probes (a
      └────────────────────────── the probe succeeds ◀──────────────────────────┘ Redis lease)

An attempt *fails* when it gets no valid HTTP answer (timeout, connection error, invalid HTTP) or a
5xx; any other answer (2xx, 4xx, 429, a body we refuse) is a *success*: the API is up, and a
success closes the circuit and resets the count. :func:`outcome_of` decides. A success costs a
Redis round trip only when this worker's view shows failures or an open circuit, so "in a row"
holds to within one refresh of the view.

The caller asks :meth:`CircuitBreaker.enter` before each attempt, before it takes a limiter token.
While the circuit is open, ``enter`` holds (sleeps; no call, no token, no attempt counted) until
the cool-down is over; then exactly one caller of all workers gets a ticket marked as the probe
(``lua/circuit_check.lua``, SET NX with a lease of the API's timeout + 5 s), and the others go on
holding until its outcome (``lua/circuit_record.lua``) closes the circuit or opens it again. A
failure that finds the circuit open (the probe's, or a call that went before this worker knew)
is given back: :meth:`CircuitBreaker.record` says so, and the caller holds and tries again
without counting the attempt. So events wait for the API instead of burning retries into dead
letters; other APIs are not affected.

Each worker keeps a view per API, refreshed from Redis by one of its callers at a time, at most
every ``poll`` seconds: a closed circuit costs one Redis round trip per API per worker per poll,
and holders sleep between refreshes. An outcome this worker records updates its view at once (a
success that closes the circuit wakes its holders); other workers see it at their next refresh.
If Redis cannot be reached the view stays as it was (one warning per outage): the limiter decides
whether calls go on. :meth:`CircuitBreaker.close` makes every holder raise ShuttingDown at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from .errors import CallError, ServiceUnavailable, ShuttingDown
from .quota import REDIS_ERRORS, Keys, load_script, redis_now, text
from .shutdown import ShutdownGuard

__all__ = ["CircuitBreaker", "CircuitState", "Outcome", "Ticket", "outcome_of", "read_circuit"]

log = logging.getLogger("enricher.circuit")
T = TypeVar("T")
Outcome = Literal["success", "failure", "neutral"]

FAILURES_TTL_MS = 600_000  # a run of failures is forgotten after 10 quiet minutes
OPEN_GRACE_MS = 600_000  # an open circuit nobody probes closes by itself 10 minutes after cool-down
LEASE_EXTRA = 5.0  # seconds a probe may take beyond the API's timeout (its limiter wait)
MIN_NAP = 0.005  # seconds: the shortest sleep between two looks at the shared state


class CircuitConfig(Protocol):
    """The fields of ``config.CircuitSettings`` read here."""

    @property
    def failures(self) -> int: ...
    @property
    def cool_down(self) -> float: ...


class CircuitApi(Protocol):
    """The fields of ``config.ApiSettings`` read here."""

    @property
    def timeout(self) -> float: ...
    @property
    def circuit(self) -> CircuitConfig: ...


def outcome_of(error: CallError | None) -> Outcome:
    """What an attempt says about the API: ``error`` None is an answer we used."""
    if error is None:
        return "success"
    if error.kind in ("timeout", "connection"):
        return "failure"
    if error.status is None:  # no valid HTTP answer at all
        return "failure" if error.kind == "bad_response" else "neutral"
    return "failure" if error.status >= 500 else "success"


@dataclass(frozen=True, slots=True)
class Ticket:
    """Leave to make one attempt; ``probe`` is the lease's token when it is the probe."""

    api: str
    probe: str | None = None


@dataclass(frozen=True, slots=True)
class CircuitState:
    """One API's circuit as stored in Redis (for ``status`` and metrics)."""

    api: str
    state: Literal["closed", "open", "half-open"]
    failures: int
    cool_down_until: datetime | None
    probing: bool

    def as_dict(self) -> dict[str, Any]:
        until = self.cool_down_until
        return {
            "api": self.api,
            "state": self.state,
            "failures": self.failures,
            "cool_down_until": until.isoformat() if until else None,
            "probing": self.probing,
        }


class _Gate:
    """One API's view in this worker."""

    __slots__ = ("config", "failures", "fresh_until", "keys", "lease", "open", "refresh", "token")

    def __init__(self, api: CircuitApi, keys: Keys) -> None:
        self.config = api.circuit
        self.keys = list(keys.circuit)
        self.lease = api.timeout + LEASE_EXTRA
        self.open = False
        self.failures = 0
        self.fresh_until = float("-inf")  # the view is trusted until then (local clock)
        self.token: tuple[str, float] | None = None  # a probe lease taken here, and its end
        self.refresh: asyncio.Future[None] | None = None


class CircuitBreaker:
    """The circuit breakers of every configured API whose ``circuit.failures`` is not 0.

    ``redis`` is owned by the caller (not closed here); it should have socket timeouts.
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        app_id: str,
        apis: Mapping[str, CircuitApi],
        poll: float = 0.5,
        redis_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gates = {
            name: _Gate(api, Keys.of(app_id, name))
            for name, api in apis.items()
            if api.circuit.failures > 0
        }
        self._poll = poll
        self._timeout = redis_timeout
        self._clock = clock
        self._check_script = redis.register_script(load_script("circuit_check.lua"))
        self._record_script = redis.register_script(load_script("circuit_record.lua"))
        self._wake: dict[str, asyncio.Event] = {}
        self._guard = ShutdownGuard("circuit breaker")
        self._redis_down = False

    async def enter(self, api: str) -> Ticket:
        """Leave to make one attempt at ``api``; holds while its circuit is open (raises
        ShuttingDown if closed meanwhile). An API without a breaker passes at once."""
        gate = self._gates.get(api)
        if gate is None:
            return Ticket(api)
        while True:
            if self._guard.closed:
                raise ShuttingDown("the circuit breaker is closed")
            now = self._clock()
            if gate.token is not None:  # a lease taken here: exactly one caller probes with it
                (token, lease_end), gate.token = gate.token, None
                if now < lease_end:
                    return Ticket(api, token)
            if now < gate.fresh_until:
                if not gate.open:
                    return Ticket(api)
                await self._nap(api, gate.fresh_until - now)
                continue
            if gate.refresh is None or gate.refresh.done():  # one refresh at a time per API
                gate.refresh = asyncio.ensure_future(self._refresh(gate))
            await self._guard.run(asyncio.shield(gate.refresh))

    async def record(self, ticket: Ticket, outcome: Outcome) -> bool:
        """Tell the attempt's outcome. True when it failed and the circuit is open now (this
        failure opened it, or it already was): the attempt does not count, the caller should
        ``enter`` again (hold) and retry. Never raises for Redis."""
        gate = self._gates.get(ticket.api)
        if gate is None:
            return False
        if outcome == "neutral":
            if ticket.probe is not None:
                await self._send(gate, ticket, "release")
            return False
        if outcome == "success" and ticket.probe is None and not gate.open and not gate.failures:
            return False  # nothing to reset: no round trip
        reply = await self._send(gate, ticket, outcome)
        if reply is None:
            return False
        state, (wait_us, failures, changed) = text(reply[0]), (int(n) for n in reply[1:4])
        if outcome == "failure" and state == "closed" and gate.open:
            # A failure never closes a circuit: this answer predates the one that opened it
            # (concurrent records run in order, but their answers may be read out of order).
            # Taken as it came, it reopened the view and let held callers through at once.
            return True
        self._update(gate, state != "closed", wait_us / 1e6, failures)
        if changed:
            self._tell(ticket, gate, outcome)
        if state == "closed":
            self._rouse(ticket.api)
        return outcome == "failure" and gate.open

    async def release(self, ticket: Ticket) -> None:
        """A ticket that made no attempt (shutdown, an error before the call): a probe gives
        its lease back so another caller may probe at once."""
        gate = self._gates.get(ticket.api)
        if gate is not None and ticket.probe is not None:
            await self._send(gate, ticket, "release")

    async def close(self) -> None:
        """Make every holder, and every later ``enter``, raise ShuttingDown."""
        self._guard.close()
        for gate in self._gates.values():
            if gate.refresh is not None:
                gate.refresh.cancel()

    async def _refresh(self, gate: _Gate) -> None:
        token = secrets.token_hex(8)
        args = [str(round(gate.lease * 1000)), token]
        try:
            reply = await asyncio.wait_for(
                self._check_script(keys=gate.keys, args=args), self._timeout
            )
        except (*REDIS_ERRORS, redis.exceptions.RedisError) as exc:
            self._unreachable(exc)
            gate.fresh_until = self._clock() + self._poll
            return
        self._reachable()
        state, wait_us, failures = text(reply[0]), int(reply[1]), int(reply[2])
        self._update(gate, state != "closed", wait_us / 1e6 if state == "open" else 0.0, failures)
        if state == "probe":
            gate.token = (token, self._clock() + gate.lease)

    def _update(self, gate: _Gate, is_open: bool, cool_down_left: float, failures: int) -> None:
        gate.open, gate.failures = is_open, failures
        look_again = self._poll
        if is_open and cool_down_left > 0:
            look_again = max(MIN_NAP, min(self._poll, cool_down_left))
        gate.fresh_until = self._clock() + look_again

    async def _send(self, gate: _Gate, ticket: Ticket, outcome: str) -> list[Any] | None:
        config = gate.config
        args = [
            outcome,
            str(config.failures),
            str(round(config.cool_down * 1e6)),
            ticket.probe or "",
            str(FAILURES_TTL_MS),
            str(OPEN_GRACE_MS),
        ]
        try:
            reply = await asyncio.wait_for(
                self._record_script(keys=gate.keys, args=args), self._timeout
            )
        except (*REDIS_ERRORS, redis.exceptions.RedisError) as exc:
            self._unreachable(exc)
            return None
        self._reachable()
        return list(reply)

    def _tell(self, ticket: Ticket, gate: _Gate, outcome: Outcome) -> None:
        api, cool_down = ticket.api, gate.config.cool_down
        if outcome == "success":
            log.warning("api %s: circuit closed: the API answers again", api)
        elif ticket.probe is not None:
            log.warning("api %s: probe failed; circuit open for another %gs", api, cool_down)
        else:
            log.warning(
                "api %s: circuit opened after %d failed attempts in a row; calls held for %gs",
                api,
                gate.failures,
                cool_down,
            )

    async def _nap(self, api: str, seconds: float) -> None:
        """Sleep ``seconds``, or less if this worker closes the circuit meanwhile."""
        wake = self._wake.setdefault(api, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await self._guard.run(asyncio.wait_for(wake.wait(), seconds))

    def _rouse(self, api: str) -> None:
        wake = self._wake.pop(api, None)
        if wake is not None:
            wake.set()

    def _unreachable(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            log.warning("circuit breaker: Redis unreachable (%s); views kept", type(exc).__name__)

    def _reachable(self) -> None:
        self._redis_down = False


async def read_circuit(client: aioredis.Redis, app_id: str, api: str) -> CircuitState:
    """One API's circuit as stored in Redis (raises ServiceUnavailable)."""
    keys = Keys.of(app_id, api).circuit
    try:
        now = await redis_now(client)
        opened, failures, probe = await client.mget(keys)
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("redis", str(exc)) from exc
    count = int(text(failures)) if failures is not None else 0
    if opened is None:
        return CircuitState(api, "closed", count, None, False)
    until = int(text(opened)) / 1e6
    state: Literal["open", "half-open"] = "open" if until > now else "half-open"
    return CircuitState(api, state, count, datetime.fromtimestamp(until, UTC), probe is not None)
