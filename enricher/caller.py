"""Calls to third-party APIs: aiohttp with per-API concurrency, the shared limiter and retries.

Each attempt passes, in this order, the API's circuit breaker (held while the API is deemed down,
see :mod:`enricher.circuit`), a limiter token (so retries count against the rate and quotas too, in
the call's lane) together with a seat of the API's per-worker concurrency (taken only once the token
is granted, so a call waiting for a token holds no seat), then makes one request. A failure that
finds the circuit open does not count as an attempt: the call holds until the circuit closes and
tries again, so an API that is down holds its events instead of dead-lettering them. Retries are
also bounded by the event's deadline and the worker's retry budget (:mod:`enricher.retry_limits`):
only the requests and the retry waits count against the deadline, never these holds. With a
response cache and an API that caches, the whole retrying call runs inside ``get_or_call`` under
the request's key (see :mod:`enricher.cache`): a cached answer takes no token. Everything aiohttp
raises is translated here into a CallError whose message holds no URL, query, header or library
text.

After every answer the API's own signals are followed for every worker: ``Retry-After`` on a
429/503 blocks the API (capped by ``max_retry_after``); ``X-RateLimit-*`` / ``RateLimit`` headers
(:mod:`enricher.signals`) go to the limiter with the number of the grant they answer, which keeps
every worker within what the server has left, paced evenly until its reset (none left blocks the
API until then, same cap).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Collection, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import aiohttp
from yarl import URL

from .cache import ResponseCache, caches, render_url, request_key_of
from .circuit import CircuitBreaker, outcome_of
from .errors import CallError, ErrorKind
from .lanes import Lane
from .retry import RetryConfig, RetryPolicy, Sleep, parse_retry_after
from .retry_limits import timing
from .signals import RateSignal, read_signal
from .urls import UrlTemplate

__all__ = ["ApiCaller", "ApiConfig", "CallLimiter", "decode_json"]


MAX_JSON_DEPTH = 64
_CHUNK = 64 * 1024
_RETRY_AFTER_STATUSES = frozenset({429, 503})


class CallLimiter(Protocol):
    """The part of ``limiter.Limiter`` the caller uses."""

    async def acquire(
        self, api: str, lane: Lane | None = None, seat: asyncio.Semaphore | None = None
    ) -> int | None:
        """A token for one call, with ``seat`` taken (the caller releases it after the call)."""

    async def block(self, api: str, seconds: float) -> None: ...
    async def server_signal(
        self, api: str, remaining: int, reset: float, grant: int | None = None
    ) -> None: ...


class ApiConfig(Protocol):
    """The fields of ``config.ApiSettings`` the caller reads."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def timeout(self) -> float: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def retry(self) -> RetryConfig: ...
    @property
    def max_response_bytes(self) -> int: ...
    @property
    def cache_ttl(self) -> float: ...
    @property
    def cache_not_found_ttl(self) -> float: ...


class _Endpoint:
    """Everything about one API that is worked out once, not per call."""

    __slots__ = (
        "cached",
        "headers",
        "method",
        "name",
        "on_status",
        "policy",
        "semaphore",
        "settings",
        "template",
        "timeout",
    )

    def __init__(self, settings: ApiConfig) -> None:
        self.settings = settings
        self.name = settings.name
        self.method = settings.method
        self.headers = dict(settings.headers)
        self.template = UrlTemplate(settings.url)
        self.timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self.semaphore = asyncio.BoundedSemaphore(settings.concurrency)
        self.policy = RetryPolicy(settings.retry, api=settings.name)
        self.on_status: Collection[int] = frozenset(settings.retry.on_status)
        self.cached = caches(settings)

    def error(self, kind: ErrorKind, message: str, **extra: Any) -> CallError:
        return CallError(kind, message, api=self.name, **extra)


class ApiCaller:
    """Calls the configured APIs over one shared aiohttp session (one per worker)."""

    def __init__(
        self,
        *,
        apis: Mapping[str, ApiConfig],
        limiter: CallLimiter,
        session: aiohttp.ClientSession,
        sleep: Sleep = asyncio.sleep,
        cache: ResponseCache | None = None,
        circuits: CircuitBreaker | None = None,
    ) -> None:
        self._endpoints = {name: _Endpoint(settings) for name, settings in apis.items()}
        self._limiter = limiter
        self._session = session
        self._sleep = sleep
        self._cache = cache
        self._circuits = circuits

    async def close(self) -> None:
        """Make calls held by an open circuit (and later ones) raise ShuttingDown; the circuit
        breaker is owned here. The session, limiter and cache are closed by their owner."""
        if self._circuits is not None:
            await self._circuits.close()

    def call(self, api: str, params: Mapping[str, Any], lane: Lane | None = None) -> Awaitable[Any]:
        """The call, to await: it gives the decoded JSON body. (A plain function handing over
        the retrying call's coroutine: one frame less to pass through at every wait of a call.)

        Raises InvalidEvent at once when a param cannot go into the URL (null, empty path value,
        a ``..`` segment); the awaited call raises CallError (kind, status, attempts filled) when
        attempts are exhausted or the error is not retriable. GET sends the params in the URL
        only; POST also sends all of them as a JSON object body. ShuttingDown from the limiter
        or the circuit breaker propagates unchanged. Every attempt takes its limiter token in
        ``lane`` (None: live traffic). A cached answer makes no attempt; a cached not-found
        raises a CallError with ``attempts`` 0. While the API's circuit is open the call waits
        (see the module docstring).
        """
        endpoint = self._endpoints[api]
        url = render_url(endpoint.name, endpoint.template, params)
        body = dict(params) if endpoint.method == "POST" else None
        # encoded=True: send exactly these bytes; no re-quoting, no '..' normalisation.
        target = URL(url, encoded=True)
        if self._cache is None or not endpoint.cached:
            return self._call(endpoint, target, body, lane)
        key = request_key_of(endpoint.name, endpoint.method, url, body)
        fetch = partial(self._call, endpoint, target, body, lane)
        return self._cache.get_or_call(endpoint.settings, key, fetch)

    async def _call(self, endpoint: _Endpoint, url: URL, body: Any, lane: Lane | None) -> Any:
        """The retrying call: attempts until an answer, a final error or the attempts run out.

        The first attempt is made before tenacity is involved: most calls succeed at once, and
        a tenacity controller per call cost a few percent of the worker's CPU. When it fails,
        tenacity takes over as if it had made it (its first "attempt" re-raises that error), so
        waits, stops and logs are those of a plain tenacity loop."""
        attempts = 1
        limits = endpoint.policy.limits()  # the event's deadline, the worker's retry budget
        try:
            with limits.active():
                try:
                    return await self._attempt(endpoint, url, body, lane)
                except CallError as exc:
                    if not exc.retriable or endpoint.policy.attempts <= 1:
                        raise
                    first: CallError | None = exc
                async for attempt in endpoint.policy.retrying(self._sleep, limits):
                    with attempt:
                        attempts = attempt.retry_state.attempt_number
                        if first is not None:
                            failed, first = first, None
                            raise failed
                        return await self._attempt(endpoint, url, body, lane)
        except CallError as exc:
            exc.attempts = attempts
            limits.explain(exc)
            raise
        raise AssertionError("unreachable: tenacity ends with a result or an error")

    async def _attempt(self, endpoint: _Endpoint, url: URL, body: Any, lane: Lane | None) -> Any:
        """One counted attempt: held while the circuit is open, and made again (not counted)
        when it fails and finds the circuit open."""
        if self._circuits is None:
            return await self._exchange(endpoint, url, body, lane)
        while True:
            ticket = await self._circuits.enter(endpoint.name)
            try:
                result = await self._exchange(endpoint, url, body, lane)
            except CallError as exc:
                if await self._circuits.record(ticket, outcome_of(exc)):
                    continue  # the API is deemed down: hold, then go again
                raise
            except Exception:  # no attempt made (ShuttingDown from the limiter, ...)
                await self._circuits.release(ticket)
                raise
            await self._circuits.record(ticket, "success")
            return result

    async def _exchange(self, endpoint: _Endpoint, url: URL, body: Any, lane: Lane | None) -> Any:
        # The limiter hands the seat over with the token (it holds none while refused).
        grant = await self._limiter.acquire(endpoint.name, lane, endpoint.semaphore)
        try:
            # only the request counts against the deadline: not the waits for a seat or token
            with timing():
                result, retry_after, signal = await self._request(endpoint, url, body)
        finally:
            endpoint.semaphore.release()
        if retry_after is not None and retry_after > 0:
            # The server's signal wins: pause this API for every worker, then wait it out too.
            await self._limiter.block(endpoint.name, retry_after)
        if signal is not None:
            await self._follow(endpoint, signal, grant)
        if isinstance(result, CallError):
            raise result
        return result

    async def _follow(self, endpoint: _Endpoint, signal: RateSignal, grant: int | None) -> None:
        """The server's rate-limit figures, for every worker (its reset capped like a
        Retry-After), with the number of the grant they answer."""
        reset = min(signal.reset, endpoint.settings.retry.max_retry_after)
        await self._limiter.server_signal(endpoint.name, signal.remaining, reset, grant)

    async def _request(
        self, endpoint: _Endpoint, url: URL, body: Any
    ) -> tuple[Any, float | None, RateSignal | None]:
        """One HTTP exchange: (decoded body or a CallError to raise, the server's Retry-After,
        its rate-limit figures)."""
        try:
            # Awaited, not entered with ``async with``: two fewer frames for every wait of the
            # request; the connection goes back to the pool on release().
            response = await self._session.request(
                endpoint.method,
                url,
                json=body,
                headers=endpoint.headers,
                timeout=endpoint.timeout,
                allow_redirects=False,
                raise_for_status=False,
            )
            try:
                signal = read_signal(response.headers, now=datetime.now(UTC))
                if 200 <= response.status < 300:
                    return await _read_json(endpoint, response), None, signal
                return (*_status_error(endpoint, response), signal)
            finally:
                response.release()
        except TimeoutError:  # asyncio.TimeoutError and aiohttp's ServerTimeoutError
            message = f"timed out after {endpoint.settings.timeout}s"
            raise endpoint.error("timeout", message, retriable=True) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            message = f"connection failed: {_cause_name(exc)}"
            raise endpoint.error("connection", message, retriable=True) from None
        except aiohttp.ClientError as exc:
            message = f"invalid HTTP response: {type(exc).__name__}"
            raise endpoint.error("bad_response", message) from None


class _BadBody(ValueError):
    """A 2xx answer whose body we refuse. Its message is ours alone: safe to show."""


def _status_error(
    endpoint: _Endpoint, response: aiohttp.ClientResponse
) -> tuple[CallError, float | None]:
    status = response.status
    retry_after = None
    if status in _RETRY_AFTER_STATUSES:
        retry_after = parse_retry_after(
            response.headers.get("Retry-After"),
            now=datetime.now(UTC),
            cap=endpoint.settings.retry.max_retry_after,
        )
    error = endpoint.error(
        "http_status",
        f"HTTP {status} from api '{endpoint.name}'",
        status=status,
        retriable=status in endpoint.on_status,
        retry_after=retry_after,
    )
    return error, retry_after


async def _read_json(endpoint: _Endpoint, response: aiohttp.ClientResponse) -> Any:
    try:
        return decode_json(await _read_capped(endpoint, response))
    except _BadBody as exc:
        raise endpoint.error("bad_response", str(exc), status=response.status) from None


async def _read_capped(endpoint: _Endpoint, response: aiohttp.ClientResponse) -> bytes:
    """The body, refusing non-JSON types and bodies over ``max_response_bytes``."""
    content_type = response.content_type
    if not (content_type.endswith("/json") or content_type.endswith("+json")):
        raise _BadBody(f"response is {content_type}, not JSON")
    limit = endpoint.settings.max_response_bytes
    too_big = _BadBody(f"response body over {limit} bytes")
    length = response.content_length
    if length is not None and length > limit:
        response.close()
        raise too_big
    if length is not None and "Content-Encoding" not in response.headers:
        return await response.read()  # the announced length, no more (and nothing to inflate)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            response.close()  # drop the connection rather than read the rest
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(raw: bytes) -> Any:
    """Decode a JSON body; ValueError for invalid JSON, NaN/Infinity or nesting over 64 levels."""
    try:
        # json.loads with a keyword builds a decoder (and its scanner) per call: one, kept.
        value = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError:
        raise _BadBody(f"response JSON nested over {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise _BadBody(f"response is not valid JSON ({type(exc).__name__})") from None
    # Nesting needs a bracket per level: most bodies have too few to be worth a walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise _BadBody(f"response JSON nested over {MAX_JSON_DEPTH} levels")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in item if isinstance(child, dict | list))
    return deepest


def _cause_name(exc: BaseException) -> str:
    """The class of the underlying OS error when aiohttp wraps one (ConnectionRefusedError)."""
    os_error = getattr(exc, "os_error", None)
    return type(os_error if isinstance(os_error, BaseException) else exc).__name__
