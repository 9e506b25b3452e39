"""Prometheus counters of ``enricher ingest`` (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from .ingest import Outcome
from .metrics import render_metrics

__all__ = ["IngestMetrics"]


class IngestMetrics:
    """Requests by answer status, events by schema and outcome, and answer times."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "enricher_ingest_requests_total",
            "POST /events requests, by the answer's HTTP status.",
            ["code"],
            registry=self.registry,
        )
        self.events = Counter(
            "enricher_ingest_events_total",
            "Events by schema (empty when none applied) and status (accepted, rejected, failed).",
            ["schema", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "enricher_ingest_request_seconds",
            "Time to answer POST /events, broker acknowledgements included.",
            registry=self.registry,
        )

    def observe(self, code: int, outcomes: Sequence[Outcome], seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(str(code)).inc()
        self.seconds.observe(seconds)
        for outcome in outcomes:
            self.events.labels(outcome.schema or "", outcome.status).inc()

    def render(self) -> bytes:
        """The Prometheus text format."""
        return render_metrics(self.registry)
