"""Prometheus export (extra ``prometheus``): a collector read at scrape time.

Pool metrics follow the OpenTelemetry database-client conventions in Prometheus
form; event metrics are this package's own::

    db_client_connection_count{pool_name, state="idle"|"used"}
    db_client_connection_max{pool_name}
    db_client_connection_pending_requests{pool_name}
    db_client_connection_timeouts_total{pool_name}
    socketio_dbctx_events_total{namespace, event, outcome}
    socketio_dbctx_event_duration_seconds{namespace, event}     (histogram)
    socketio_dbctx_retries_total
    socketio_dbctx_leaks_total
    socketio_dbctx_pool_status{pool_name, status}                (1 for the current one)

Usage::

    from socketio_dbctx.prometheus import register, metrics_response
    register(dbctx, app)
    app.add_url_rule("/metrics", "metrics", metrics_response)

With ``socketio_dbctx.aio``, the same metrics of an ``AsyncDBContext`` (no app)::

    register(async_dbctx)                  # or register(async_dbctx, registry=registry)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Union

from flask import Flask, Response

try:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "socketio_dbctx.prometheus needs prometheus_client: "
        "pip install 'socketio-dbctx[prometheus]'"
    ) from exc

from .errors import ContextSetupError
from .leaks import PoolTracker
from .metrics import BUCKETS, EventMetrics
from .pool import STATUSES
from .shapes import PoolStatus
from .state import app_state

if TYPE_CHECKING:
    from .aio import AsyncDBContext
    from .extension import DBContext

    AnyDBContext = Union[DBContext, AsyncDBContext]

__all__ = ["DBContextCollector", "metrics_response", "register"]


class DBContextCollector:
    """Reads one app's pool dicts and event metrics whenever Prometheus scrapes.

    :param dbctx: the extension: a ``DBContext``, or an ``AsyncDBContext``
        (``socketio_dbctx.aio``, then without ``app``).
    :param app: the app whose numbers to export (``DBContext`` only).
    """

    def __init__(self, dbctx: AnyDBContext, app: Flask | None = None) -> None:
        self._pools: Callable[[], dict[str, PoolStatus]]
        self._metrics: EventMetrics
        self._tracker: PoolTracker
        if app is None:
            from .aio import AsyncDBContext

            if not isinstance(dbctx, AsyncDBContext):
                raise ContextSetupError(
                    "register(dbctx, app) needs the app for a DBContext; only an "
                    "AsyncDBContext is registered without one"
                )
            self._pools = dbctx.pool_status_all
            self._metrics, self._tracker = dbctx.state.metrics, dbctx.state.tracker
            return
        if app.extensions.get("dbctx") is not dbctx:
            raise ContextSetupError(
                "this DBContext is not registered on that app: call dbctx.init_app(app) first"
            )
        state = app_state(app)
        self._pools = lambda: state.pool_statuses(app)
        self._metrics, self._tracker = state.metrics, state.tracker

    @staticmethod
    def _families() -> dict[str, Any]:
        pool, event = ["pool_name"], ["namespace", "event"]
        return {
            "count": GaugeMetricFamily(
                "db_client_connection_count",
                "Connections in the pool by state.",
                labels=["pool_name", "state"],
            ),
            "max": GaugeMetricFamily(
                "db_client_connection_max", "Most connections the pool allows.", labels=pool
            ),
            "pending": GaugeMetricFamily(
                "db_client_connection_pending_requests",
                "Events waiting for admission or a connection.",
                labels=pool,
            ),
            "timeouts": CounterMetricFamily(
                "db_client_connection_timeouts",
                "Pool checkouts that timed out inside Socket.IO events.",
                labels=pool,
            ),
            "events": CounterMetricFamily(
                "socketio_dbctx_events",
                "Socket.IO events handled, by outcome.",
                labels=[*event, "outcome"],
            ),
            "durations": HistogramMetricFamily(
                "socketio_dbctx_event_duration_seconds",
                "Time from admission to ack, retries included.",
                labels=event,
            ),
            "retries": CounterMetricFamily(
                "socketio_dbctx_retries", "Retries of transient failures.", labels=[]
            ),
            "status": GaugeMetricFamily(
                "socketio_dbctx_pool_status",
                "The pool's status: 1 for the current one (healthy, unknown, warning, "
                "exhausted, unhealthy, draining), 0 for the others.",
                labels=["pool_name", "status"],
            ),
            "leaks": CounterMetricFamily(
                "socketio_dbctx_leaks",
                "Connections reported as leaked (out longer than DBCTX_LEAK_THRESHOLD).",
                labels=[],
            ),
        }

    def describe(self) -> list[Metric]:
        # Names only: the registry checks for duplicates without any database call.
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        f = self._families()
        for name, pool in self._pools().items():
            f["count"].add_metric([name, "idle"], pool["checked_in"])
            f["count"].add_metric([name, "used"], pool["checked_out"])
            if pool["capacity"] is not None:
                f["max"].add_metric([name], pool["capacity"])
            f["pending"].add_metric([name], pool["waiting"])
            for status in STATUSES:
                f["status"].add_metric([name, status], 1.0 if pool["status"] == status else 0.0)
        # SQLAlchemy's TimeoutError does not say which pool; events use the default one.
        f["timeouts"].add_metric(["default"], metrics.pool_timeouts)
        for s in metrics.stats():
            ok = s.count - s.errors - s.busy
            for outcome, value in (("ok", ok), ("error", s.errors), ("busy", s.busy)):
                f["events"].add_metric([s.namespace, s.event, outcome], value)
            cumulative, buckets = 0, []
            for bound, hits in zip((*map(str, BUCKETS), "+Inf"), s.buckets):
                cumulative += hits
                buckets.append((bound, cumulative))
            f["durations"].add_metric([s.namespace, s.event], buckets, s.total_seconds)
        f["retries"].add_metric([], metrics.retries_total)
        f["leaks"].add_metric([], self._tracker.leaks_total)
        yield from f.values()


def register(
    dbctx: AnyDBContext,
    app: Flask | CollectorRegistry | None = None,
    registry: CollectorRegistry | None = None,
) -> DBContextCollector:
    """Register a collector for ``app`` with ``registry`` (default: the global one).

    For an ``AsyncDBContext`` there is no app: ``register(dbctx)``,
    ``register(dbctx, registry=r)`` or ``register(dbctx, r)``; the metric names and
    labels are the same.
    """
    if isinstance(app, CollectorRegistry):
        if registry is not None:
            raise TypeError("register() got two registries")
        app, registry = None, app
    collector = DBContextCollector(dbctx, app)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector


def metrics_response(registry: Any = None) -> Response:
    """A Flask response with the registry's metrics in the Prometheus text format.

    Usable directly as a view: ``app.add_url_rule("/metrics", view_func=metrics_response)``.
    """
    data = generate_latest(registry if isinstance(registry, CollectorRegistry) else REGISTRY)
    return Response(data, mimetype=CONTENT_TYPE_LATEST)
