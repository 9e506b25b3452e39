"""The worker's own HTTP views, on its Faust web port (``worker.web_host``, ``--web-port``).

GET /metrics   Prometheus text exposition (:mod:`enricher.metrics`), from a registry of this
               worker's own
GET /health    200 ``{"ok": true, ...}``; 503 ``{"ok": false, "stuck": [...]}`` when a
               partition has had work and no committed progress for over 60 s
"""

from __future__ import annotations

from typing import Any, Final

from .monitor import WorkerMonitor

__all__ = ["METRICS_CONTENT_TYPE", "install_views"]

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def install_views(app: Any, monitor: WorkerMonitor) -> None:
    """Add ``/metrics`` and ``/health`` to a Faust app (before it starts)."""

    async def metrics(view: Any, request: Any) -> Any:
        return view.bytes(monitor.metrics(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def health(view: Any, request: Any) -> Any:
        ok, body = monitor.health()
        return view.json(body, status=200 if ok else 503)

    app.page("/metrics", name="enricher-metrics")(metrics)
    app.page("/health", name="enricher-health")(health)
