"""ApiCaller against a real local aiohttp server: encoding, retries, limits, failures, secrets."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from enricher.caller import ApiCaller, decode_json
from enricher.config import ApiSettings
from enricher.errors import CallError, InvalidEvent, ShuttingDown
from enricher.lanes import Lane
from enricher.local_limiter import MemoryLimiter

from .fakes import FakeApi, FakeRetry

CANARY = "canary-SECRET-123"


Retry = FakeRetry
Api = partial(FakeApi, headers={"X-Api-Key": CANARY})


class FakeLimiter:
    def __init__(self, fail_with: BaseException | None = None) -> None:
        self.acquired: list[str] = []
        self.lanes: list[Lane | None] = []
        self.blocked: list[tuple[str, float]] = []
        self.signals: list[tuple[str, int, float]] = []
        self.fail_with = fail_with

    async def acquire(
        self, api: str, lane: Lane | None = None, seat: asyncio.Semaphore | None = None
    ) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if seat is not None:
            await seat.acquire()  # handed over with the token, as the real limiters do
        self.acquired.append(api)
        self.lanes.append(lane)

    async def block(self, api: str, seconds: float) -> None:
        self.blocked.append((api, seconds))

    async def server_signal(
        self, api: str, remaining: int, reset: float, grant: int | None = None
    ) -> None:
        self.signals.append((api, remaining, reset))


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Backend:
    """The third-party API: records what it saw and answers from a script."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.script: deque[web.StreamResponse] = deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self.streamed = 0
        self.release = asyncio.Event()
        self.base = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/echo/{tail:.*}", self.echo)
        app.router.add_get("/script", self.scripted)
        app.router.add_get("/hang", self.hang)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/stream", self.stream)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        seen = {"raw_path": request.raw_path, "host": request.host, "body": body}
        self.seen.append({**seen, "headers": dict(request.headers)})
        return web.json_response(seen)

    async def scripted(self, request: web.Request) -> web.StreamResponse:
        self.seen.append({"raw_path": request.raw_path})
        return self.script.popleft()

    async def hang(self, request: web.Request) -> web.Response:
        await self.release.wait()  # longer than any client timeout in these tests
        return web.json_response({})

    async def slow(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)  # keep requests overlapping long enough to count them
        self.in_flight -= 1
        return web.json_response({"ok": True})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"[" + b"1," * 32_767 + b"1]"
        for _ in range(1024):  # 64 MiB if the client never stops reading
            await response.write(chunk)
            self.streamed += len(chunk)
        return response


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)  # a third party's log
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = Backend()
    runner, server.base = await _start(server.app())
    yield server
    server.release.set()
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@dataclass
class Harness:
    session: aiohttp.ClientSession
    limiter: FakeLimiter = field(default_factory=FakeLimiter)
    sleep: FakeSleep = field(default_factory=FakeSleep)

    async def call(
        self, api: Api, params: Mapping[str, Any] | None = None, lane: Lane | None = None
    ) -> Any:
        caller = ApiCaller(
            apis={api.name: api}, limiter=self.limiter, session=self.session, sleep=self.sleep
        )
        return await caller.call(api.name, params or {}, lane)


@pytest.fixture
def harness(session: aiohttp.ClientSession) -> Harness:
    return Harness(session)


def _json(status: int = 200, body: Any = None, **headers: str) -> web.Response:
    return web.json_response(body if body is not None else {}, status=status, headers=headers)


def _raw(body: bytes, content_type: str = "application/json") -> web.Response:
    return web.Response(body=body, headers={"Content-Type": content_type})


def _gzipped(body: bytes) -> web.Response:
    """A small Content-Length that inflates past the cap (a zip bomb, in miniature)."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    return web.Response(body=gzip.compress(body), headers=headers)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- success paths -------------------------------------------------------------------------


async def test_get_fills_the_path_encoded_and_sends_headers(
    backend: Backend, harness: Harness
) -> None:
    api = Api("geo", backend.base + "/echo/geo/{ip}?lang={lang}&fixed=1")
    body = await harness.call(api, {"ip": "../../admin?x=1#f", "lang": "en&evil=1"})
    assert body["raw_path"] == "/echo/geo/..%2F..%2Fadmin%3Fx%3D1%23f?lang=en%26evil%3D1&fixed=1"
    assert body["host"] == backend.base.removeprefix("http://")
    assert backend.seen[0]["headers"]["X-Api-Key"] == CANARY
    assert harness.limiter.acquired == ["geo"]


async def test_params_are_stringified_for_the_url(backend: Backend, harness: Harness) -> None:
    api = Api("geo", backend.base + "/echo/{id}?flag={flag}&n={n}")
    body = await harness.call(api, {"id": 42, "flag": True, "n": 1.5})
    assert body["raw_path"] == "/echo/42?flag=true&n=1.5"


async def test_post_sends_all_params_as_a_json_body(backend: Backend, harness: Harness) -> None:
    api = Api("score", backend.base + "/echo/score/{user}", method="POST")
    body = await harness.call(api, {"user": "u/1", "amount": 12, "vip": False})
    assert body["raw_path"] == "/echo/score/u%2F1"
    assert body["body"] == {"user": "u/1", "amount": 12, "vip": False}


async def test_503_twice_then_200_succeeds_on_the_third_attempt(
    backend: Backend, harness: Harness
) -> None:
    backend.script.extend([_json(503), _json(503), _json(200, {"city": "Paris"})])
    assert await harness.call(Api("geo", backend.base + "/script")) == {"city": "Paris"}
    assert harness.limiter.acquired == ["geo"] * 3
    assert len(harness.sleep.delays) == 2
    assert all(0.1 <= delay <= 1.0 for delay in harness.sleep.delays)
    assert harness.limiter.blocked == []


async def test_every_attempt_takes_its_token_in_the_call_lane(
    backend: Backend, harness: Harness
) -> None:
    lane = Lane("replay-1", 0.3)
    backend.script.extend([_json(503), _json(200, {"ok": 1})])
    assert await harness.call(Api("geo", backend.base + "/script"), lane=lane) == {"ok": 1}
    await harness.call(Api("geo", backend.base + "/echo/x"))
    assert harness.limiter.lanes == [lane, lane, None]


async def test_429_retry_after_blocks_every_worker_then_waits(
    backend: Backend, harness: Harness
) -> None:
    backend.script.extend([_json(429, **{"Retry-After": "1"}), _json(200, {"ok": 1})])
    assert await harness.call(Api("geo", backend.base + "/script")) == {"ok": 1}
    assert harness.limiter.blocked == [("geo", 1.0)]
    assert harness.sleep.delays == [1.0]


async def test_absurd_retry_after_is_capped(backend: Backend, harness: Harness) -> None:
    backend.script.extend([_json(503, **{"Retry-After": "999999"}), _json(200)])
    api = Api("geo", backend.base + "/script", retry=Retry(max_retry_after=20.0))
    await harness.call(api)
    assert harness.limiter.blocked == [("geo", 20.0)]
    assert harness.sleep.delays == [20.0]


async def test_rate_limit_headers_go_to_the_limiter_with_the_reset_capped(
    backend: Backend, harness: Harness
) -> None:
    backend.script.extend(
        [
            _json(200, {"ok": 1}, **{"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "20"}),
            _json(503, **{"RateLimit": '"default";r=0;t=999999'}),
            _json(200, {"ok": 2}),
        ]
    )
    api = Api("geo", backend.base + "/script", retry=Retry(max_retry_after=30.0))
    assert await harness.call(api) == {"ok": 1}
    assert await harness.call(api) == {"ok": 2}
    assert harness.limiter.signals == [("geo", 3, 20.0), ("geo", 0, 30.0)]
    assert harness.limiter.blocked == []  # no Retry-After: the limiter decides


# --- failures ------------------------------------------------------------------------------


async def _fails(harness: Harness, api: Api, params: Mapping[str, Any] | None = None) -> CallError:
    with pytest.raises(CallError) as caught:
        await harness.call(api, params)
    error = caught.value
    assert error.api == api.name
    return error


async def test_exhausted_attempts(backend: Backend, harness: Harness) -> None:
    backend.script.extend([_json(502) for _ in range(3)])
    error = await _fails(harness, Api("geo", backend.base + "/script"))
    assert (error.kind, error.status, error.attempts, error.retriable) == (
        "http_status",
        502,
        3,
        True,
    )
    assert error.message == "HTTP 502 from api 'geo'"
    assert len(harness.limiter.acquired) == 3 and len(harness.sleep.delays) == 2


async def test_404_is_not_retried(backend: Backend, harness: Harness) -> None:
    backend.script.append(_json(404))
    error = await _fails(harness, Api("geo", backend.base + "/script"))
    assert (error.kind, error.status, error.attempts, error.retriable) == (
        "http_status",
        404,
        1,
        False,
    )
    assert harness.sleep.delays == []


async def test_429_not_in_on_status_still_blocks_but_is_not_retried(
    backend: Backend, harness: Harness
) -> None:
    backend.script.append(_json(429, **{"Retry-After": "3"}))
    api = Api("geo", backend.base + "/script", retry=Retry(on_status=(503,)))
    error = await _fails(harness, api)
    assert (error.status, error.attempts, error.retry_after) == (429, 1, 3.0)
    assert harness.limiter.blocked == [("geo", 3.0)]


async def test_timeout(backend: Backend, harness: Harness) -> None:
    api = Api("geo", backend.base + "/hang", timeout=0.2, retry=Retry(attempts=2))
    error = await _fails(harness, api)
    assert (error.kind, error.message, error.attempts) == ("timeout", "timed out after 0.2s", 2)
    assert error.status is None and error.retriable


async def test_connection_refused(harness: Harness) -> None:
    api = Api("geo", f"http://127.0.0.1:{_free_port()}/x?key={CANARY}")
    error = await _fails(harness, api)
    assert error.kind == "connection" and error.attempts == 3
    assert error.message == "connection failed: ConnectionRefusedError"


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (lambda: _raw(b"hello", "text/plain"), "response is text/plain, not JSON"),
        (lambda: _raw(b'{"a": '), "response is not valid JSON (JSONDecodeError)"),
        (lambda: _raw(b"\xff\xfe\xfd"), "response is not valid JSON (UnicodeDecodeError)"),
        (lambda: _raw(b'{"a": NaN}'), "response is not valid JSON (ValueError)"),
        (lambda: _raw(b"[" * 65 + b"]" * 65), "response JSON nested over 64 levels"),
        (lambda: _raw(b"[" * 2000 + b"]" * 2000), "response JSON nested over 64 levels"),
        (lambda: _raw(b"1" * 5000), "response body over 4096 bytes"),
        (lambda: _gzipped(b"[" + b"0," * 100_000 + b"0]"), "response body over 4096 bytes"),
    ],
)
async def test_bad_bodies(
    backend: Backend,
    harness: Harness,
    response: Callable[[], web.Response],
    message: str,
) -> None:
    backend.script.append(response())
    error = await _fails(harness, Api("geo", backend.base + "/script"))
    assert (error.kind, error.message, error.status, error.attempts) == (
        "bad_response",
        message,
        200,
        1,
    )


@pytest.mark.parametrize(
    ("answer", "kind", "message"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "bad_response", "invalid HTTP response: ClientResponseError"),
        (b"", "connection", "connection failed: ServerDisconnectedError"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{",
            "connection",
            "connection failed: ClientPayloadError",
        ),
    ],
)
async def test_broken_http_is_translated(
    harness: Harness, answer: bytes, kind: str, message: str
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        api = Api("geo", f"http://127.0.0.1:{port}/x?key={CANARY}", retry=Retry(attempts=2))
        error = await _fails(harness, api)
    assert (error.kind, error.message) == (kind, message)
    assert error.attempts == (2 if kind == "connection" else 1)
    assert CANARY not in "".join(traceback.format_exception(error))


async def test_nesting_up_to_the_limit_is_accepted(backend: Backend, harness: Harness) -> None:
    backend.script.append(_raw(b"[" * 64 + b"]" * 64))
    assert await harness.call(Api("geo", backend.base + "/script")) is not None


async def test_chunked_body_over_the_cap_is_cut_off(backend: Backend, harness: Harness) -> None:
    api = Api("geo", backend.base + "/stream", max_response_bytes=256 * 1024)
    error = await _fails(harness, api)
    assert (error.kind, error.message) == ("bad_response", "response body over 262144 bytes")
    assert backend.streamed < 32 * 1024 * 1024, "the client stopped reading and hung up"


async def test_redirects_are_not_followed(backend: Backend, harness: Harness) -> None:
    other = Backend()
    runner, other.base = await _start(other.app())
    try:
        backend.script.append(
            web.Response(status=302, headers={"Location": other.base + "/echo/x"})
        )
        error = await _fails(harness, Api("geo", backend.base + "/script"))
    finally:
        await runner.cleanup()
    assert (error.kind, error.status, error.retriable, error.attempts) == (
        "http_status",
        302,
        False,
        1,
    )
    assert other.seen == []


async def test_concurrency_is_capped_per_api(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    api = Api("geo", backend.base + "/slow", concurrency=2)
    limiter = FakeLimiter()
    caller = ApiCaller(apis={"geo": api}, limiter=limiter, session=session, sleep=FakeSleep())
    results = await asyncio.gather(*(caller.call("geo", {}) for _ in range(10)))
    assert results == [{"ok": True}] * 10
    assert backend.max_in_flight == 2
    assert len(limiter.acquired) == 10


async def test_replay_calls_waiting_for_their_share_leave_live_calls_the_seats(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    # 20/s for the API, 0.5/s for a replay of share 0.025: its second and third calls wait 2 s
    # and 4 s for their slots. Were a waiting call to hold one of the 2 seats, the live calls
    # would queue behind those two for 2 s or more; as it is, they are done in about 0.5 s.
    limits = ApiSettings.model_validate(
        {"name": "geo", "url": backend.base + "/echo/{x}", "rate": "20/s", "burst": 2}
    )
    limiter = MemoryLimiter(apis={"geo": limits})
    api = Api("geo", backend.base + "/echo/{x}", concurrency=2)
    caller = ApiCaller(apis={"geo": api}, limiter=limiter, session=session)
    lane = Lane("r1", 0.025)
    replayed = [asyncio.create_task(caller.call("geo", {"x": f"r{i}"}, lane)) for i in range(3)]
    await asyncio.sleep(0)  # the replay's calls ask first
    await asyncio.gather(*(caller.call("geo", {"x": f"l{i}"}) for i in range(10)))
    order = [seen["raw_path"] for seen in backend.seen]
    assert order[0] == "/echo/r0"  # the replay's burst of 1 ...
    assert sorted(order[1:]) == sorted(f"/echo/l{i}" for i in range(10))  # ... then all live
    assert not any(task.done() for task in replayed[1:])  # the replay still waiting
    for task in replayed:
        task.cancel()
    await asyncio.gather(*replayed, return_exceptions=True)
    await limiter.close()


async def test_shutting_down_propagates_unchanged(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    stop = ShuttingDown("worker stopping")
    harness = Harness(session, limiter=FakeLimiter(fail_with=stop))
    with pytest.raises(ShuttingDown) as caught:
        await harness.call(Api("geo", backend.base + "/echo/x"))
    assert caught.value is stop
    assert backend.seen == [] and harness.sleep.delays == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ip": None}, "URL placeholder ip: value is null"),
        ({"ip": [1]}, "URL placeholder ip: value is a list, not a string, number or boolean"),
        ({"ip": "\ud800"}, "a URL param is not valid Unicode"),
        ({"ip": ".."}, "bad URL param: a path value would make a '.' or '..' segment"),
        ({"ip": ""}, "bad URL param: empty value for path placeholder ip"),
        ({}, "no value for URL placeholder ip"),
    ],
)
async def test_unusable_params_are_invalid_events(
    backend: Backend, harness: Harness, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        await harness.call(Api("geo", backend.base + "/echo/{ip}"), params)
    assert (caught.value.message, caught.value.api) == (message, "geo")
    assert backend.seen == [] and harness.limiter.acquired == []


# --- secrets -------------------------------------------------------------------------------


async def _every_failure(backend: Backend, harness: Harness) -> list[CallError]:
    secret_query = f"?key={CANARY}"
    backend.script.extend(
        [_json(503, **{"Retry-After": "1"}) for _ in range(2)]
        + [_json(404), _raw(b"nope", "text/plain"), _raw(b"{"), _raw(b"x" * 5000)]
        + [web.Response(status=301, headers={"Location": f"http://evil/{CANARY}"})]
    )
    apis = [Api("geo", backend.base + "/script" + secret_query, retry=Retry(attempts=2))]
    apis += [Api("geo", backend.base + "/script" + secret_query)] * 5
    apis.append(
        Api("geo", backend.base + "/hang" + secret_query, timeout=0.1, retry=Retry(attempts=2))
    )
    apis.append(Api("geo", f"http://127.0.0.1:{_free_port()}/x{secret_query}"))
    return [await _fails(harness, api) for api in apis]


async def test_secrets_never_reach_errors_or_logs(
    backend: Backend, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors = await _every_failure(backend, harness)
    kinds = {error.kind for error in errors}
    assert kinds == {"http_status", "bad_response", "timeout", "connection"}
    log = logging.getLogger("test.secrets")
    for error in errors:
        log.error("call failed: %s %r", error, error, exc_info=error)
        shown = [str(error), repr(error), json.dumps(error.as_dict())]
        shown.append("".join(traceback.format_exception(error)))
        assert not [text for text in shown if CANARY in text]
    assert caplog.records, "retries were logged"
    assert CANARY not in caplog.text


def test_decode_json_rejects_what_the_caller_rejects() -> None:
    assert decode_json(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    # what json.loads takes of bytes: a UTF-8 BOM, UTF-16 and UTF-32
    assert decode_json(b'\xef\xbb\xbf{"a": "\xc3\xa9"}') == {"a": "\u00e9"}
    assert decode_json('{"a": "\u00e9"}'.encode("utf-16")) == {"a": "\u00e9"}
    assert decode_json('["x"]'.encode("utf-32-le")) == ["x"]
    bad = (b"", b"{", b'{"a": Infinity}', b'{"a": NaN}', b'["\xff"]', b"[" * 100 + b"]" * 100)
    for raw in (*bad, b"9" * 5000):
        with pytest.raises(ValueError):
            decode_json(raw)


async def test_unknown_api_is_a_key_error(harness: Harness) -> None:
    caller = ApiCaller(apis={}, limiter=harness.limiter, session=harness.session)
    with pytest.raises(KeyError):
        await caller.call("nope", {})


async def test_works_with_the_real_config_models(backend: Backend, harness: Harness) -> None:
    config = pytest.importorskip("enricher.config")
    settings = config.config_from_dict(
        {
            "apis": {
                "geo": {
                    "url": backend.base + "/echo/geo/{ip}",
                    "method": "post",
                    "headers": {"X-Api-Key": CANARY},
                    "rate": "100/s",
                    "retry": {"attempts": 2, "backoff": "100ms..1s"},
                }
            }
        }
    )
    caller = ApiCaller(
        apis=settings.apis, limiter=harness.limiter, session=harness.session, sleep=harness.sleep
    )
    body = await caller.call("geo", {"ip": "1.2.3.4/x"})
    assert body["raw_path"] == "/echo/geo/1.2.3.4%2Fx" and body["body"] == {"ip": "1.2.3.4/x"}
    assert backend.seen[0]["headers"]["X-Api-Key"] == CANARY
