"""The forwarding-only Faust agent: a ceiling for any Faust worker on this stack.

One agent on the input topic that does nothing but ``await output_topic.send(...)`` per event
(no decoding beyond Faust's JSON, no HTTP, no limiter). Run by the bench as
``env BENCH_...=... python -m bench.forward worker -l warn`` (settings in ``faustapp.py``).
"""

from __future__ import annotations

from typing import Any

from .faustapp import AppEnv, create_app

env = AppEnv.read()
app = create_app(env)
events = app.topic(env.input, key_serializer="raw", value_serializer="json")
forwarded = app.topic(env.output, key_serializer="raw", value_serializer="json")


@app.agent(events)  # type: ignore[untyped-decorator]
async def forward(stream: Any) -> None:
    async for key, event in stream.items():
        await forwarded.send(key=key, value=event)


if __name__ == "__main__":
    app.main()
