"""What every scenario takes (:class:`Options`) and gives back (:class:`Measured`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAST_RATE", "Measured", "Options"]

FAST_RATE = 100_000.0  # calls/s: a limit that never binds here


@dataclass(frozen=True, slots=True)
class Options:
    events: int = 2000
    runs: int = 3
    share: float = 0.5  # the replays' share of the rate
    cold_rate: float = 200.0  # the binding rate of the cold replay (calls/s)
    cold_burst: int = 20
    concurrency: int = 32  # apis.geo.concurrency (the default), and the bare client's
    in_flight: int = 256  # worker.in_flight (the default)
    slow_rate: float = 400.0  # latency-bound: the limit (calls/s) against a 50 ms API
    precision_rate: float = 40.0  # precision: the limit the workers share (calls/s)
    precision_workers: int = 3
    precision_events: int = 600
    footprint_in_flight: int = 512
    recipe_concurrency: int = 1  # the recipe agent's concurrency (Faust's default)
    recipe_budget: float = 10.0  # seconds a slow side is measured for, at most


@dataclass
class Measured:
    figures: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
