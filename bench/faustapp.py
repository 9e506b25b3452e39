"""What the hand-written Faust apps of the bench (``recipe.py``, ``forward.py``) share: their
settings, read from ``BENCH_*`` environment variables the bench sets for each process.

Only what this embedded stack needs is set (broker, Tansu-friendly timeouts, a free web port on
loopback, partitions); everything else is Faust's default, as in a user's app.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ENV", "AppEnv", "create_app"]

ENV = {
    "app_id": "BENCH_APP_ID",
    "broker": "BENCH_BROKER",
    "input": "BENCH_INPUT",
    "output": "BENCH_OUTPUT",
    "web_port": "BENCH_WEB_PORT",
    "api_url": "BENCH_API_URL",
    "rate": "BENCH_RATE",
    "concurrency": "BENCH_CONCURRENCY",
}


@dataclass(frozen=True, slots=True)
class AppEnv:
    """One bench Faust process's settings (see :data:`ENV` for the variable names)."""

    app_id: str
    broker: str
    input: str
    output: str
    web_port: int
    api_url: str = ""  # with ``{ip}``; the recipe only
    rate: float = 0.0  # calls/s of the recipe's AsyncLimiter
    concurrency: int = 1  # the recipe agent's concurrency

    @classmethod
    def read(cls) -> AppEnv:
        """From the environment; a missing required variable is named."""
        missing = [ENV[k] for k in ("app_id", "broker", "input", "output", "web_port")]
        missing = [name for name in missing if not os.environ.get(name)]
        if missing:
            raise SystemExit(f"bench app: set {', '.join(missing)}")
        env = os.environ
        return cls(
            app_id=env[ENV["app_id"]],
            broker=env[ENV["broker"]],
            input=env[ENV["input"]],
            output=env[ENV["output"]],
            web_port=int(env[ENV["web_port"]]),
            api_url=env.get(ENV["api_url"], ""),
            rate=float(env.get(ENV["rate"], "0") or 0),
            concurrency=int(env.get(ENV["concurrency"], "1") or 1),
        )

    def assignments(self) -> list[str]:
        """``NAME=value`` for each setting (for ``env`` on a command line)."""
        values = {
            "app_id": self.app_id,
            "broker": self.broker,
            "input": self.input,
            "output": self.output,
            "web_port": self.web_port,
            "api_url": self.api_url,
            "rate": f"{self.rate:g}",
            "concurrency": self.concurrency,
        }
        return [f"{ENV[key]}={value}" for key, value in values.items()]


def create_app(env: AppEnv) -> Any:
    """The Faust app, with what the bench's embedded stack needs and Faust's defaults otherwise."""
    import faust  # here, so that the bench itself (which only spawns these apps) never loads it

    return faust.App(
        env.app_id,
        broker=env.broker,
        broker_session_timeout=3.0,  # Tansu makes a joining member wait on both (PITFALLS 8)
        broker_rebalance_timeout=3.0,
        broker_heartbeat_interval=1.0,
        topic_partitions=4,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        web_port=env.web_port,
        autodiscover=False,
    )
