"""One worker's view of itself: the snapshot behind ``/metrics``, ``/health`` and its heartbeat.

    snapshot = {
        "worker": "host:pid:web_port", "started_at": <Unix time>, "web_url": "http://...",
        "partitions": [PartitionState.as_dict(), ...],      # assigned to this worker
        "in_flight": {"live": <events>, "replay": <events>},
        "apis": {name: ApiStats.as_dict()},                 # calls, attempts, waits, rates
        "cache": {"hits", "misses", "waits", "calls", "shared"},
        "pipelines": {"live": PipelineStats, "replay": PipelineStats},
        "quotas": {name: [{"period", "limit", "used", "remaining", "resets_at"}]},
        "circuits": {name: "closed" | "open" | "half-open"},
    }

Quota figures and circuit states come from Redis (:func:`enricher.quota.read_usage`,
:func:`enricher.circuit.read_circuit`), refreshed by
:meth:`WorkerMonitor.refresh_quotas` every few seconds; everything else is read live.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .circuit import read_circuit
from .config import Config
from .errors import ServiceUnavailable
from .health import ProgressWatch
from .metrics import MetricsCollector, WorkerStats, new_registry, render_metrics
from .quota import REDIS_ERRORS, read_usage

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .runtime import Runtime

__all__ = ["PartitionSource", "WorkerMonitor", "worker_id"]

log = logging.getLogger("enricher.monitor")

TopicPartition = tuple[str, int]


class PartitionSource(Protocol):
    """What the monitor needs of the Kafka consumer (the Faust app provides it)."""

    def assigned(self) -> list[TopicPartition]: ...
    def committed(self, tp: TopicPartition) -> int | None: ...
    def highwater(self, tp: TopicPartition) -> int | None: ...


class _NoPartitions:
    def assigned(self) -> list[TopicPartition]:
        return []

    def committed(self, tp: TopicPartition) -> int | None:
        return None

    def highwater(self, tp: TopicPartition) -> int | None:
        return None


def worker_id(web_port: int) -> str:
    """``host:pid:web_port``: unique among the workers of one app_id."""
    return f"{socket.gethostname()}:{os.getpid()}:{web_port}"


class WorkerMonitor:
    """Reads a worker's state for ``/metrics``, ``/health`` and heartbeats."""

    def __init__(
        self,
        config: Config,
        *,
        web_port: int,
        partitions: PartitionSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.worker = worker_id(web_port)
        host = config.worker.web_host
        shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
        self.web_url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{web_port}"
        self.started_at = wall()
        self.partitions: PartitionSource = partitions or _NoPartitions()
        self.watch = ProgressWatch(clock=clock)
        self.runtime: Runtime[Any] | None = None
        self.quotas: dict[str, list[dict[str, Any]]] = {}
        self.circuits: dict[str, str] = {}
        self._stuck: set[TopicPartition] = set()
        self.registry = new_registry(MetricsCollector(self.snapshot, self._stats))

    def attach(self, runtime: Runtime[Any]) -> None:
        self.runtime = runtime

    def _stats(self) -> WorkerStats | None:
        return self.runtime.stats if self.runtime is not None else None

    # --- partitions ----------------------------------------------------------------------------

    def partition_states(self) -> list[dict[str, Any]]:
        """Every assigned partition's progress (observed now; logs stuck ones once)."""
        topics = (self.config.topics.input, self.config.topics.replay)
        try:  # Faust's own internal topics (its assignor's) are not ours to report
            assigned = sorted(tp for tp in self.partitions.assigned() if tp[0] in topics)
        except Exception:  # consumer not started or between assignments
            assigned = []
        self.watch.forget(assigned)
        runtime = self.runtime
        # per lane: in-flight count, oldest in-flight (offset, start), last release
        lanes: dict[str, tuple[dict[Any, int], dict[Any, tuple[int, float]], dict[Any, Any]]] = {}
        for topic in topics:
            pipeline = self._pipeline_of(topic)
            if pipeline is not None:
                tracker = pipeline.tracker
                counts = {tp: tracker.in_flight(tp) for tp in assigned if tp[0] == topic}
                lanes[topic] = (counts, tracker.oldest_since(), tracker.released())
        states = []
        for tp in assigned:
            counts, oldest, released = lanes.get(tp[0], ({}, {}, {}))
            committed = self._safe(self.partitions.committed, tp)
            if committed is None and tp in released:  # Faust's figure unknown: our last ack
                committed = released[tp][0]
            state = self.watch.observe(
                tp[0],
                tp[1],
                committed=committed,
                highwater=self._safe(self.partitions.highwater, tp),
                in_flight=counts.get(tp, 0),
                oldest=oldest.get(tp),
            )
            states.append(state.as_dict())
        if runtime is not None:
            self._log_stuck(states)
        return states

    def _pipeline_of(self, topic: str) -> Pipeline[Any] | None:
        if self.runtime is None:
            return None
        if topic == self.config.topics.replay:
            return self.runtime.replay_pipeline
        return self.runtime.pipeline

    @staticmethod
    def _safe(read: Callable[[TopicPartition], int | None], tp: TopicPartition) -> int | None:
        try:
            value = read(tp)
        except Exception:
            return None
        return int(value) if value is not None else None

    def _log_stuck(self, states: Iterable[dict[str, Any]]) -> None:
        stuck = {(s["topic"], s["partition"]) for s in states if s["stuck"]}
        for topic, partition in sorted(stuck - self._stuck):
            state = next(s for s in states if (s["topic"], s["partition"]) == (topic, partition))
            log.warning(
                "partition %s/%s stuck: no committed progress for %.0fs while it has work",
                topic,
                partition,
                state["stalled_for"],
                extra={"topic": topic, "partition": partition, "offset": state["oldest_offset"]},
            )
        for topic, partition in sorted(self._stuck - stuck):
            log.info(
                "partition %s/%s progressing again",
                topic,
                partition,
                extra={"topic": topic, "partition": partition},
            )
        self._stuck = stuck

    # --- quotas --------------------------------------------------------------------------------

    async def refresh_quotas(self) -> bool:
        """Read every API's quota usage and circuit state from Redis; False when Redis cannot
        be reached."""
        runtime = self.runtime
        if runtime is None:
            return True
        fresh: dict[str, list[dict[str, Any]]] = {}
        circuits: dict[str, str] = {}
        try:
            for api in self.config.apis.values():
                usage = await read_usage(runtime.redis, self.config.app_id, api)
                fresh[api.name] = [
                    {
                        "period": q.period,
                        "limit": q.limit,
                        "used": q.used,
                        "remaining": q.remaining,
                        "resets_at": q.resets_at.timestamp(),
                    }
                    for q in usage.quotas
                ]
                circuit = await read_circuit(runtime.redis, self.config.app_id, api.name)
                circuits[api.name] = circuit.state
        except (ServiceUnavailable, *REDIS_ERRORS):
            return False
        self.quotas = fresh
        self.circuits = circuits
        return True

    # --- the snapshot --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything this worker reports (see the module docstring)."""
        runtime = self.runtime
        snap: dict[str, Any] = {
            "worker": self.worker,
            "started_at": self.started_at,
            "web_url": self.web_url,
            "partitions": self.partition_states(),
            "in_flight": {"live": 0, "replay": 0},
            "apis": {},
            "cache": {},
            "pipelines": {},
            "quotas": self.quotas,
            "circuits": self.circuits,
        }
        if runtime is None:
            return snap
        snap["in_flight"] = {
            "live": runtime.pipeline.tracker.in_flight(),
            "replay": runtime.replay_pipeline.tracker.in_flight(),
        }
        snap["apis"] = {name: stats.as_dict() for name, stats in runtime.stats.apis.items()}
        snap["cache"] = dataclasses.asdict(runtime.cache.stats)
        snap["pipelines"] = {
            "live": dataclasses.asdict(runtime.pipeline.stats),
            "replay": dataclasses.asdict(runtime.replay_pipeline.stats),
        }
        return snap

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(ok, body)`` for ``/health``: not ok when a partition is stuck."""
        states = self.partition_states()
        stuck = [f"{s['topic']}/{s['partition']}" for s in states if s["stuck"]]
        body = {
            "ok": not stuck,
            "worker": self.worker,
            "started": self.runtime is not None,
            "stall_after": self.watch.stall_after,
            "stuck": stuck,
            "partitions": states,
        }
        return not stuck, body

    def metrics(self) -> bytes:
        """The Prometheus text exposition of this worker."""
        return render_metrics(self.registry)
