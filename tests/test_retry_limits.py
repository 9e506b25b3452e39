"""The retry budget and the per-event deadline, on a stepped clock (no sleeping)."""

from __future__ import annotations

from functools import partial

import pytest
import yaml

from enricher.config import config_from_dict, render_effective
from enricher.errors import CallError, ConfigError
from enricher.retry import RetryPolicy
from enricher.retry_limits import RetryBudget, timing

from .fakes import FakeRetry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Retry = partial(
    FakeRetry, attempts=10, backoff_min=0.3, backoff_max=0.3, on_status=(503,), deadline=1.0
)


# --- the budget ----------------------------------------------------------------------------------


def test_budget_allows_its_ratio_of_first_attempts_plus_the_floor() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, window=10.0, min_per_second=1.0, clock=clock)
    for _ in range(100):
        budget.record_call()
    granted = sum(budget.try_retry() for _ in range(100))
    assert granted == 20 + 10  # 0.2 x 100 first attempts + 1/s over 10 s


def test_a_trickle_still_retries_within_the_floor() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, window=10.0, min_per_second=1.0, clock=clock)
    budget.record_call()
    assert [budget.try_retry() for _ in range(11)] == [True] * 10 + [False]


def test_the_window_slides() -> None:
    clock = Clock()
    budget = RetryBudget(0.0, window=10.0, min_per_second=0.5, clock=clock)
    assert sum(budget.try_retry() for _ in range(10)) == 5
    clock.now += 9.0  # the spent retries are still in the window
    assert not budget.try_retry()
    clock.now += 1.0  # now they have left it
    assert sum(budget.try_retry() for _ in range(10)) == 5


def test_denied_retries_take_nothing() -> None:
    clock = Clock()
    budget = RetryBudget(1.0, window=10.0, min_per_second=0.0, clock=clock)
    budget.record_call()
    assert budget.try_retry()
    assert not any(budget.try_retry() for _ in range(50))
    budget.record_call()
    assert budget.try_retry()


# --- the policy: deadline and budget as tenacity's stop ------------------------------------------


class Api:
    """A failing API on the stepped clock: each request takes ``latency`` of it."""

    def __init__(self, clock: Clock, latency: float = 0.1, retry_after: float | None = None):
        self.clock = clock
        self.latency = latency
        self.retry_after = retry_after
        self.requests = 0

    async def request(self) -> None:
        self.requests += 1
        self.clock.now += self.latency
        raise CallError("http_status", "HTTP 503", status=503, retriable=True,
                        retry_after=self.retry_after)  # fmt: skip

    async def sleep(self, seconds: float) -> None:
        self.clock.now += seconds


async def _call(policy: RetryPolicy, api: Api, hold: float = 0.0) -> CallError:
    """What the caller does: the request counts against the deadline, the hold before it not."""
    limits = policy.limits()
    with pytest.raises(CallError) as caught, limits.active():
        async for attempt in policy.retrying(api.sleep, limits):
            with attempt:
                api.clock.now += hold  # a limiter wait: not counted
                with timing():
                    await api.request()
    error = caught.value
    error.attempts = api.requests
    limits.explain(error)
    return error


async def test_a_backoff_that_would_end_past_the_deadline_is_not_waited() -> None:
    clock = Clock()
    policy = RetryPolicy(Retry(deadline=1.0), api="geo", clock=clock)
    api = Api(clock, latency=0.1)
    started = clock.now
    error = await _call(policy, api)
    # 0.1 + 0.3 + 0.1 + 0.3 + 0.1 = 0.9 spent; one more wait would end at 1.2
    assert api.requests == 3
    assert clock.now - started == pytest.approx(0.9)
    assert error.retry_stopped == "deadline"
    assert error.message == "HTTP 503; no retry: deadline exceeded (1s)"
    assert error.as_dict()["attempts"] == 3 and error.kind == "http_status"


async def test_limiter_holds_do_not_count_against_the_deadline() -> None:
    clock = Clock()
    policy = RetryPolicy(Retry(deadline=1.0), api="geo", clock=clock)
    api = Api(clock, latency=0.1)
    error = await _call(policy, api, hold=60.0)
    assert api.requests == 3 and error.retry_stopped == "deadline"


async def test_a_retry_after_longer_than_the_deadline_gives_up_at_once() -> None:
    clock = Clock()
    policy = RetryPolicy(Retry(deadline=30.0), api="geo", clock=clock)
    api = Api(clock, latency=0.1, retry_after=45.0)
    error = await _call(policy, api)
    assert api.requests == 1 and error.retry_stopped == "deadline"
    assert "deadline exceeded (30s)" in error.message


async def test_attempts_still_stop_first_without_a_reason() -> None:
    clock = Clock()
    policy = RetryPolicy(Retry(attempts=2, deadline=100.0), api="geo", clock=clock)
    api = Api(clock)
    error = await _call(policy, api)
    assert api.requests == 2 and error.retry_stopped is None
    assert error.message == "HTTP 503"


async def test_an_exhausted_budget_stops_retries() -> None:
    clock = Clock()
    policy = RetryPolicy(Retry(deadline=100.0, budget=0.0), api="geo", clock=clock)
    while policy.budget.try_retry():  # spend the floor
        pass
    api = Api(clock)
    error = await _call(policy, api)
    assert api.requests == 1
    assert error.retry_stopped == "budget"
    assert error.message == "HTTP 503; no retry: retry budget exhausted"


async def test_the_budget_is_shared_by_the_calls_of_one_policy() -> None:
    clock = Clock()
    policy = RetryPolicy(Retry(attempts=3, deadline=100.0, budget=0.0), api="geo", clock=clock)
    total = 0
    for _ in range(40):  # 40 failing calls at once, as far as the 10 s window goes
        api = Api(clock, latency=0.0)
        await _call(policy, api)
        total += api.requests - 1
    assert total == 30  # the floor: 3 retries a second over the 10 s window


async def test_retries_paced_by_a_retry_after_do_not_use_the_budget() -> None:
    clock = Clock()
    policy = RetryPolicy(Retry(attempts=4, deadline=100.0, budget=0.0), api="geo", clock=clock)
    while policy.budget.try_retry():
        pass
    api = Api(clock, retry_after=1.0)
    error = await _call(policy, api)
    assert api.requests == 4 and error.retry_stopped is None  # the attempts ran out


# --- config ---------------------------------------------------------------------------------------


def _retry(**retry: object) -> dict[str, object]:
    return {"apis": {"geo": {"url": "http://api.test/{ip}", "rate": "5/s", "retry": retry}}}


def test_config_defaults_and_effective_rendering() -> None:
    config = config_from_dict(_retry(deadline="90s", budget=0.5))
    retry = config.apis["geo"].retry
    assert (retry.deadline, retry.budget) == (90.0, 0.5)
    shown = yaml.safe_load(render_effective(config))["apis"]["geo"]["retry"]
    assert (shown["deadline"], shown["budget"]) == ("90s", 0.5)
    defaults = config_from_dict(_retry()).apis["geo"].retry
    assert (defaults.deadline, defaults.budget) == (30.0, 0.2)


@pytest.mark.parametrize(
    ("retry", "message"),
    [
        ({"deadline": "0s"}, "apis.geo.retry.deadline: must be > 0, got '0s'"),
        ({"deadline": "soon"}, "apis.geo.retry.deadline: "),
        ({"budget": -0.1}, "apis.geo.retry.budget: must be >= 0, got -0.1"),
        ({"budget": True}, "apis.geo.retry.budget: expected a number, got True"),
        ({"budget": "lots"}, "apis.geo.retry.budget: expected a number, got 'lots'"),
    ],
)
def test_config_refuses_bad_values_naming_the_key(retry: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(_retry(**retry))
    assert str(caught.value).startswith(message)
