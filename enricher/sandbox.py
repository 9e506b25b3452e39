"""The sandbox third-party API: deterministic answers, latency, faults and its own rate limit.

Endpoints (every one except ``/stats`` counts as a call)::

    GET  /geo/{ip}            {ip, country, city, lat, lon, asn}   from a hash of ``ip``
    POST /score               {score, risk, request_id}            from a hash of the JSON body
    GET  /fx/{base}/{quote}   {base, quote, rate}                  rate(a,b) * rate(b,c) ~ rate(a,c)
    GET  /big/{size}          a JSON object of about ``size`` bytes (response-size caps)
    GET  /text/{anything}     200 with a body that is not JSON (bad responses)
    GET  /status/{code}       answers that status (non-retriable errors, ...)
    GET  /fault/{kind}/{any}  a misbehaving API, by ``kind``: ``5xx`` (503), ``429`` (no
                              Retry-After), ``429-absurd`` (Retry-After: 999999999), ``timeout``
                              (no answer for ``hang`` seconds), ``reset`` (connection reset),
                              ``nonjson`` (200 text/html), ``huge`` (a 50 MB JSON answer, streamed),
                              ``drip`` (200 JSON, one byte every ``drip_interval`` seconds)
    GET  /stats/calls         every call's arrival (epoch seconds), raw path and Host header
    GET  /stats[?detail=1]    what it saw; ``detail`` adds per-request counts
    POST /stats/reset         forget it all

Each call, in order: counted on arrival (a real provider counts attempts); refused with ``429`` and
``Retry-After`` (integer seconds, at least 1) when its token bucket is empty, or when the fixed
window's ``window_limit`` is used (windows of ``window`` seconds aligned on the epoch); then, with
``failing``, every admitted call gets ``fail_status``; then the first ``fail_first_n`` admitted
calls get ``fail_status``; then a seeded draw picks 500/502/503 with probability ``error_rate``;
then ``latency`` is slept; then the answer. 429s are not delayed.

With a ``window_limit``, ``ratelimit_headers`` describes the window on every answer (``x``:
``X-RateLimit-Limit/Remaining/Reset`` with Reset in seconds; ``x-epoch``: Reset as epoch seconds;
``ietf``: ``RateLimit: "window";r=R;t=T`` and ``RateLimit-Policy: "window";q=L;w=W``;
``ietf-dict``: ``RateLimit: limit=L, remaining=R, reset=T``); reset times are whole seconds,
rounded up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import json
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

__all__ = [
    "SandboxServer",
    "SandboxSettings",
    "create_sandbox_app",
    "fx_answer",
    "geo_answer",
    "run_sandbox",
    "score_answer",
    "serve_sandbox",
]

WINDOW = 120  # seconds of per-second counts kept
CALL_LOG = 200_000  # calls kept by the call log (arrival, raw path, Host), the oldest dropped
HUGE_BYTES = 50 * 1024 * 1024
_FAULTS = (500, 502, 503)
_PLACES = (
    ("US", "New York", 40.71, -74.01, 7018),
    ("US", "Seattle", 47.61, -122.33, 7922),
    ("DE", "Berlin", 52.52, 13.40, 3320),
    ("FR", "Paris", 48.86, 2.35, 3215),
    ("GB", "London", 51.51, -0.13, 2856),
    ("JP", "Tokyo", 35.68, 139.69, 2516),
    ("BR", "Sao Paulo", -23.55, -46.63, 28573),
    ("IN", "Mumbai", 19.08, 72.88, 9829),
    ("AU", "Sydney", -33.87, 151.21, 1221),
    ("ZA", "Cape Town", -33.92, 18.42, 37457),
)


@dataclass(frozen=True)
class SandboxSettings:
    """How the sandbox behaves. ``latency`` is seconds, or a ``(min, max)`` range drawn per call."""

    rate: float | None = None  # admitted calls per second; None = no limit
    burst: int | None = None  # bucket size; None = one second's worth, at least 1
    latency: float | tuple[float, float] = 0.0
    error_rate: float = 0.0  # share of admitted calls answered 500/502/503
    seed: int = 0
    fail_first_n: int = 0  # the first N admitted calls get fail_status
    fail_status: int = 503
    retry_after: float | None = (
        None  # Retry-After on 429s (instead of the bucket's wait) and faults
    )
    retry_after_date: bool = False  # send Retry-After as an HTTP date instead of seconds
    path_latency: Mapping[str, float] = field(default_factory=dict)  # extra delay per exact path
    window_limit: int | None = None  # admitted calls per fixed window; None = no window
    window: float = 1.0  # seconds per window
    ratelimit_headers: Literal["none", "x", "x-epoch", "ietf", "ietf-dict"] = "none"
    failing: bool = False  # every admitted call gets fail_status (an API that is down)
    hang: float = 30.0  # seconds a /fault/timeout call waits before answering
    drip_interval: float = 0.5  # seconds between the bytes of a /fault/drip answer

    def __post_init__(self) -> None:
        low, high = self.latency if isinstance(self.latency, tuple) else (self.latency,) * 2
        checks = {
            "rate must be > 0": self.rate is None or self.rate > 0,
            "burst must be >= 1": self.burst is None or self.burst >= 1,
            "latency must be >= 0 with min <= max": 0 <= low <= high,
            "error_rate must be within 0..1": 0.0 <= self.error_rate <= 1.0,
            "fail_first_n must be >= 0": self.fail_first_n >= 0,
            "fail_status must be 400..599": 400 <= self.fail_status <= 599,
            "window_limit must be >= 1": self.window_limit is None or self.window_limit >= 1,
            "window must be > 0": self.window > 0,
            "hang must be >= 0": self.hang >= 0,
            "drip_interval must be > 0": self.drip_interval > 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)

    @property
    def effective_burst(self) -> int:
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate or 1))


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def _unit(data: bytes) -> float:
    """A float in [0, 1) from 4 bytes."""
    return int.from_bytes(data[:4], "big") / 2**32


def geo_answer(ip: str) -> dict[str, Any]:
    """The ``/geo/{ip}`` body (computing it here is not a call)."""
    digest = _digest("geo", ip)
    country, city, lat, lon, asn = _PLACES[digest[0] % len(_PLACES)]
    jitter_lat, jitter_lon = _unit(digest[1:5]) - 0.5, _unit(digest[5:9]) - 0.5
    return {
        "ip": ip,
        "country": country,
        "city": city,
        "lat": round(lat + jitter_lat / 10, 4),
        "lon": round(lon + jitter_lon / 10, 4),
        "asn": asn,
    }


def score_answer(body: Any) -> dict[str, Any]:
    """The ``POST /score`` body for a JSON request body."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = _digest("score", canonical)
    score = round(_unit(digest), 3)
    risk = "high" if score >= 0.8 else "medium" if score >= 0.5 else "low"
    return {"score": score, "risk": risk, "request_id": digest[4:12].hex()}


def fx_answer(base: str, quote: str) -> dict[str, Any]:
    """The ``/fx/{base}/{quote}`` body; codes are upper-cased."""
    base, quote = base.upper(), quote.upper()

    def value(code: str) -> float:
        return 0.2 + 4.8 * _unit(_digest("fx", code))

    rate = 1.0 if base == quote else round(value(base) / value(quote), 6)
    return {"base": base, "quote": quote, "rate": rate}


class _Bucket:
    """Token bucket: ``take`` returns 0 when admitted, else the seconds until a token."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.stamp = float(burst), clock()

    def take(self) -> float:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class _Recorder:
    """What the sandbox saw; ``snapshot`` is the ``/stats`` body."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.per_second: dict[int, int] = {}
        self.admitted_per_second: dict[int, int] = {}
        self.paths: Counter[str] = Counter()
        self.paths_ok: Counter[str] = Counter()
        self.in_flight = self.max_concurrent = 0
        self.max_calls = self.max_admitted = 0
        self.calls: deque[tuple[float, str, str]] = deque(maxlen=CALL_LOG)
        self.arrived = asyncio.Event()  # set at every arrival (in-process waiters clear it)

    def log_call(self, request: web.Request) -> None:
        """Keep the call's arrival time, raw path (as sent, before decoding) and Host header."""
        self.calls.append((time.time(), request.raw_path, request.headers.get("Host", "")))

    def call_log(self) -> list[dict[str, Any]]:
        return [{"time": t, "path": path, "host": host} for t, path, host in self.calls]

    def arrive(self, key: str, second: int) -> None:
        self.counts["calls"] += 1
        self.arrived.set()
        self.paths[key] += 1
        self.in_flight += 1
        self.max_concurrent = max(self.max_concurrent, self.in_flight)
        self.max_calls = max(self.max_calls, _bump(self.per_second, second))

    def admit(self, second: int) -> None:
        self.max_admitted = max(self.max_admitted, _bump(self.admitted_per_second, second))

    def answer(self, key: str, status: int) -> None:
        self.in_flight -= 1
        if 200 <= status < 300:
            self.counts["ok"] += 1
            self.paths_ok[key] += 1
        elif status == 429:
            self.counts["rejected_429"] += 1
        elif status >= 500:
            self.counts["errors_5xx"] += 1
        elif status >= 400:
            self.counts["errors_4xx"] += 1

    def snapshot(self, detail: bool = False) -> dict[str, Any]:
        stats: dict[str, Any] = {
            name: self.counts[name]
            for name in ("calls", "ok", "rejected_429", "errors_4xx", "errors_5xx")
        }
        stats |= {
            "max_calls_in_any_second": self.max_calls,
            "max_admitted_in_any_second": self.max_admitted,
            "calls_per_second": {str(s): n for s, n in sorted(self.per_second.items())},
            "admitted_per_second": {str(s): n for s, n in sorted(self.admitted_per_second.items())},
            "max_concurrent": self.max_concurrent,
            "in_flight": self.in_flight,
            "paths_seen_count": len(self.paths),
        }
        if detail:
            stats |= {"paths": dict(self.paths), "paths_ok": dict(self.paths_ok)}
        return stats


def _bump(per_second: dict[int, int], second: int) -> int:
    per_second[second] = per_second.get(second, 0) + 1
    for old in [s for s in per_second if s <= second - WINDOW]:
        del per_second[old]
    return per_second[second]


class _State:
    """Settings plus everything that changes per call."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.recorder = _Recorder()
        self.configure(settings)

    def configure(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.bucket = _Bucket(settings.rate, settings.effective_burst) if settings.rate else None
        self.faults = random.Random(settings.seed)
        self.delays = random.Random(settings.seed + 1)
        self.admitted = 0
        self.window_index, self.window_used = -1, 0

    def take_window(self) -> tuple[bool, dict[str, str], int]:
        """One unit of the fixed window: (admitted, the headers describing the window, whole
        seconds until it resets)."""
        limit, width = self.settings.window_limit, self.settings.window
        if limit is None:
            return True, {}, 0
        now = time.time()
        index = math.floor(now / width)
        if index != self.window_index:
            self.window_index, self.window_used = index, 0
        admitted = self.window_used < limit
        self.window_used += admitted
        reset = max(1, math.ceil((index + 1) * width - now))
        return admitted, self._window_headers(limit, limit - self.window_used, reset), reset

    def _window_headers(self, limit: int, remaining: int, reset: int) -> dict[str, str]:
        kind, width = self.settings.ratelimit_headers, self.settings.window
        if kind in ("x", "x-epoch"):
            end = reset if kind == "x" else math.ceil(time.time() + reset)
            return {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(end),
            }
        if kind == "ietf":
            return {
                "RateLimit": f'"window";r={remaining};t={reset}',
                "RateLimit-Policy": f'"window";q={limit};w={math.ceil(width)}',
            }
        if kind == "ietf-dict":
            return {"RateLimit": f"limit={limit}, remaining={remaining}, reset={reset}"}
        return {}

    def reset(self) -> None:
        old, self.recorder = self.recorder, _Recorder()
        old.arrived.set()  # waiters for calls count again, on the new recorder
        self.configure(self.settings)

    def fault(self) -> int | None:
        """The status this admitted call must fail with, if any (deterministic by seed)."""
        self.admitted += 1
        if self.settings.failing or self.admitted <= self.settings.fail_first_n:
            return self.settings.fail_status
        if self.settings.error_rate and self.faults.random() < self.settings.error_rate:
            return self.faults.choice(_FAULTS)
        return None

    def delay(self, path: str) -> float:
        latency = self.settings.latency
        base = self.delays.uniform(*latency) if isinstance(latency, tuple) else latency
        return base + self.settings.path_latency.get(path, 0.0)

    def retry_after(self, wait: float | None) -> dict[str, str]:
        seconds = self.settings.retry_after if self.settings.retry_after is not None else wait
        if seconds is None:
            return {}
        whole = max(1, math.ceil(seconds))
        if self.settings.retry_after_date:
            return {"Retry-After": email.utils.formatdate(time.time() + whole, usegmt=True)}
        return {"Retry-After": str(whole)}


STATE = web.AppKey("sandbox_state", _State)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _request_key(request: web.Request) -> str:
    """How ``/stats?detail=1`` names a request: the path and query, plus the body if any."""
    body = await request.text() if request.can_read_body else ""
    return f"{request.path_qs} {body}"[:1000] if body else request.path_qs


@web.middleware
async def _account(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/stats" or request.path.startswith("/stats/"):
        return await handler(request)
    state = request.app[STATE]
    state.recorder.log_call(request)
    key, second = await _request_key(request), int(time.time())
    state.recorder.arrive(key, second)
    status = 0  # stays 0 if cancelled: no answer sent, counted in calls only
    try:
        response = await _gate(state, request, handler, second)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        status = 500
        raise
    finally:
        state.recorder.answer(key, status)


async def _gate(
    state: _State, request: web.Request, handler: Handler, second: int
) -> web.StreamResponse:
    wait = state.bucket.take() if state.bucket else 0.0
    if wait > 0:
        body = {"error": "rate limit exceeded"}
        return web.json_response(body, status=429, headers=state.retry_after(wait))
    admitted, window, reset = state.take_window()
    if not admitted:
        headers = {**window, **state.retry_after(reset)}
        return web.json_response({"error": "window limit exceeded"}, status=429, headers=headers)
    state.recorder.admit(second)
    fault = state.fault()
    await asyncio.sleep(state.delay(request.path))
    answer: web.StreamResponse
    if fault is not None:
        headers = state.retry_after(None) if fault in (429, 503) else {}
        answer = web.json_response({"error": "injected fault"}, status=fault, headers=headers)
    else:
        answer = await handler(request)
    answer.headers.update(window)
    return answer


async def _geo(request: web.Request) -> web.Response:
    return web.json_response(geo_answer(request.match_info["ip"]))


async def _score(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.text())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    return web.json_response(score_answer(body))


async def _fx(request: web.Request) -> web.Response:
    return web.json_response(fx_answer(request.match_info["base"], request.match_info["quote"]))


async def _big(request: web.Request) -> web.Response:
    size = min(int(request.match_info["size"]), 64 * 1024 * 1024)
    return web.json_response({"data": "x" * size})


async def _text(request: web.Request) -> web.Response:
    return web.Response(text="<html>not json</html>", content_type="text/html")


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    headers = request.app[STATE].retry_after(None) if code in (429, 503) else {}
    return web.json_response({"status": code}, status=code, headers=headers)


async def _fault(request: web.Request) -> web.StreamResponse:
    kind, settings = request.match_info["kind"], request.app[STATE].settings
    if kind == "5xx":
        return web.json_response({"error": "injected fault"}, status=503)
    if kind in ("429", "429-absurd"):
        headers = {"Retry-After": "999999999"} if kind == "429-absurd" else {}
        return web.json_response({"error": "rate limited"}, status=429, headers=headers)
    if kind == "timeout":
        await asyncio.sleep(settings.hang)
        return web.json_response({"late": True})
    if kind == "reset":
        if request.transport is not None:
            request.transport.abort()  # RST-like: the client sees the connection drop
        raise ConnectionResetError("sandbox: injected connection reset")
    if kind == "nonjson":
        return web.Response(text="<html>not json</html>", content_type="text/html")
    if kind == "huge":
        return await _stream(request, b'{"data": "', b"x" * 1024 * 1024, HUGE_BYTES, 0.0)
    if kind == "drip":
        return await _stream(request, b'{"drip": "', b"x", 100, settings.drip_interval)
    raise web.HTTPNotFound(text=f"no fault kind {kind!r}")


async def _stream(
    request: web.Request, head: bytes, chunk: bytes, size: int, interval: float
) -> web.StreamResponse:
    """A JSON string answer of about ``size`` bytes in ``chunk``s, ``interval`` seconds apart;
    gives up quietly when the client goes away."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    try:
        await response.write(head)
        for _ in range(max(1, size // len(chunk))):
            await response.write(chunk)
            if interval:
                await asyncio.sleep(interval)
        await response.write(b'"}')
        await response.write_eof()
    except (ConnectionError, RuntimeError):  # the client closed the connection
        pass
    return response


async def _calls(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].recorder.call_log())


async def _stats(request: web.Request) -> web.Response:
    detail = request.query.get("detail", "") not in ("", "0", "false")
    return web.json_response(request.app[STATE].recorder.snapshot(detail))


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"reset": True})


def create_sandbox_app(settings: SandboxSettings) -> web.Application:
    """The sandbox as an aiohttp application (state is per application)."""
    app = web.Application(middlewares=[_account])
    app[STATE] = _State(settings)
    app.router.add_get("/geo/{ip}", _geo)
    app.router.add_post("/score", _score)
    app.router.add_get("/fx/{base}/{quote}", _fx)
    app.router.add_get(r"/big/{size:\d+}", _big)
    app.router.add_get("/text/{anything:.*}", _text)
    app.router.add_get(r"/status/{code:[1-5]\d\d}", _status)
    app.router.add_get("/fault/{kind}/{anything:.*}", _fault)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/stats/calls", _calls)
    app.router.add_post("/stats/reset", _reset)
    return app


class SandboxServer:
    """A running sandbox: ``url``, ``port``, in-process ``stats()``, ``update()``, ``close()``."""

    def __init__(self, runner: web.AppRunner, state: _State, host: str, port: int) -> None:
        self._runner, self._state = runner, state
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"

    @property
    def settings(self) -> SandboxSettings:
        return self._state.settings

    def stats(self, detail: bool = False) -> dict[str, Any]:
        """The ``/stats`` body, without a request."""
        return self._state.recorder.snapshot(detail)

    def calls(self) -> list[dict[str, Any]]:
        """The ``/stats/calls`` body: every call's ``time``, raw ``path`` and ``host``."""
        return self._state.recorder.call_log()

    async def wait_for_calls(self, count: int, timeout: float = 30.0) -> None:
        """Until the sandbox has seen ``count`` calls since its start or reset (in-process:
        the sandbox must run on this event loop)."""
        async with asyncio.timeout(timeout):
            while (recorder := self._state.recorder).counts["calls"] < count:
                recorder.arrived.clear()
                await recorder.arrived.wait()

    def reset(self) -> None:
        """Forget all counts; the bucket refills and the fault sequence restarts."""
        self._state.reset()

    def update(self, **changes: Any) -> SandboxSettings:
        """Change settings at run time (``server.update(error_rate=1.0)``); counts are kept."""
        settings = dataclasses.replace(self._state.settings, **changes)
        self._state.configure(settings)
        return settings

    async def close(self) -> None:
        await self._runner.cleanup()


async def run_sandbox(
    settings: SandboxSettings | None = None, host: str = "127.0.0.1", port: int = 0
) -> SandboxServer:
    """Serve the sandbox on ``host:port`` (0: a free port) in the running event loop."""
    app = create_sandbox_app(settings or SandboxSettings())
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return SandboxServer(runner, app[STATE], host, int(runner.addresses[0][1]))


def serve_sandbox(settings: SandboxSettings, host: str = "127.0.0.1", port: int = 8081) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (``enricher sandbox-api``)."""
    web.run_app(create_sandbox_app(settings), host=host, port=port, access_log=None)
