"""The worker's own HTTP views, on its Faust web port (``worker.web_host``, ``--web-port``).

GET /metrics          Prometheus text exposition (:mod:`enricher.metrics`), from a registry of
                      this worker's own
GET /health           200 ``{"ok": true, ...}``; 503 ``{"ok": false, "stuck": [...]}`` when a
                      partition has had work and no committed progress for over 60 s
GET /dashboard        the operator page: one self-contained HTML file (no external assets) that
                      polls ``/dashboard.json`` every second
GET /dashboard.json   the fleet status, the same object as ``enricher status --json``
                      (:func:`enricher.status.gather_status`), read with this worker's config and
                      Redis client; 503 ``{"error": ...}`` when Redis cannot be reached
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any, Final

from .errors import ServiceUnavailable
from .metrics import METRICS_CONTENT_TYPE
from .monitor import WorkerMonitor
from .status import gather_status

__all__ = ["DASHBOARD_MAX_AGE", "DashboardData", "install_views"]

HTML_CONTENT_TYPE: Final = "text/html; charset=utf-8"
DASHBOARD_MAX_AGE: Final = 0.9  # seconds a fleet reading is reused (several open pages, one read)


def dashboard_html() -> bytes:
    """The operator page (package data ``enricher/dashboard.html``)."""
    return resources.files("enricher").joinpath("dashboard.html").read_bytes()


class DashboardData:
    """The fleet status for ``/dashboard.json``: one reading at a time, reused for
    :data:`DASHBOARD_MAX_AGE` seconds so that many open pages cost no more than one."""

    def __init__(self, monitor: WorkerMonitor, *, max_age: float = DASHBOARD_MAX_AGE) -> None:
        self._monitor = monitor
        self._max_age = max_age
        self._lock = asyncio.Lock()
        self._cached: dict[str, Any] | None = None
        self._read_at = 0.0

    async def read(self) -> dict[str, Any]:
        """Raises ServiceUnavailable when Redis cannot be reached."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._read_at < self._max_age:
                return self._cached
            runtime = self._monitor.runtime
            redis = runtime.redis if runtime is not None else None  # None: a client of its own
            status = await gather_status(self._monitor.config, redis=redis)
            status["served_by"] = self._monitor.worker
            self._cached, self._read_at = status, time.monotonic()
            return status


def install_views(app: Any, monitor: WorkerMonitor) -> None:
    """Add ``/metrics``, ``/health``, ``/dashboard`` and ``/dashboard.json`` to a Faust app
    (before it starts)."""
    data = DashboardData(monitor)

    async def metrics(view: Any, request: Any) -> Any:
        return view.bytes(monitor.metrics(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def health(view: Any, request: Any) -> Any:
        ok, body = monitor.health()
        return view.json(body, status=200 if ok else 503)

    async def dashboard(view: Any, request: Any) -> Any:
        headers = {"Content-Type": HTML_CONTENT_TYPE, "Cache-Control": "no-cache"}
        return view.bytes(dashboard_html(), headers=headers)

    async def dashboard_json(view: Any, request: Any) -> Any:
        try:
            body = await data.read()
        except ServiceUnavailable as exc:
            return view.json({"error": str(exc)}, status=503, headers={"Cache-Control": "no-store"})
        return view.json(body, headers={"Cache-Control": "no-store"})

    app.page("/metrics", name="enricher-metrics")(metrics)
    app.page("/health", name="enricher-health")(health)
    app.page("/dashboard", name="enricher-dashboard")(dashboard)
    app.page("/dashboard.json", name="enricher-dashboard-json")(dashboard_json)
