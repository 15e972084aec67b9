"""Event metrics (percentiles over a bounded window, the histogram) and the
Prometheus collector, read with a ``CollectorRegistry`` after test-client events.

The metric names are public API (DESIGN section 3); they are checked exactly as the
Prometheus text format exposes them, ``_total`` suffixes included.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.pool import NullPool

from socketio_dbctx import DBContext, DBContextNamespace
from socketio_dbctx.metrics import BUCKETS, WINDOW, EventMetrics
from socketio_dbctx.prometheus import DBContextCollector, metrics_response, register
from socketio_dbctx.state import app_state

NS = "/u"
KEY = f"{NS}:send"

# -- EventMetrics ----------------------------------------------------------------------


def record(metrics: EventMetrics, seconds: float, outcome: str = "ok", key: str = KEY) -> None:
    namespace, event = key.split(":")
    metrics.started(key, namespace, event)
    metrics.finished(key, seconds, outcome)


@pytest.mark.parametrize(
    ("durations_ms", "expected"),
    [
        (list(range(1, 101)), (50.0, 95.0, 99.0)),
        ([7.0], (7.0, 7.0, 7.0)),
        ([1.0, 2.0], (1.0, 2.0, 2.0)),
        ([5.0] * 99 + [1000.0], (5.0, 5.0, 5.0)),
        ([5.0] * 98 + [1000.0] * 2, (5.0, 5.0, 1000.0)),
        ([5.0] * 94 + [1000.0] * 6, (5.0, 1000.0, 1000.0)),
        ([0.0001, 0.0002, 0.0003], (0.0, 0.0, 0.0)),  # rounded to 3 decimals of a ms
    ],
    ids=["1-to-100", "one", "two", "1-outlier-in-100", "2-outliers-in-100", "6-in-100", "tiny"],
)
def test_percentiles_are_nearest_rank_in_ms(
    durations_ms: list[float], expected: tuple[float, float, float]
) -> None:
    metrics = EventMetrics()
    shuffled = list(durations_ms)
    random.Random(4).shuffle(shuffled)
    for ms in shuffled:
        record(metrics, ms / 1000.0)

    stats = metrics.snapshot()[KEY]

    assert (stats["p50_ms"], stats["p95_ms"], stats["p99_ms"]) == pytest.approx(expected)
    assert stats["count"] == len(durations_ms)


def test_percentiles_cover_only_the_latest_window() -> None:
    """Memory is bounded: the oldest durations leave the window, the counts stay."""
    metrics = EventMetrics()
    for _ in range(500):
        record(metrics, 10.0)  # slow, but old
    for _ in range(WINDOW):
        record(metrics, 0.001)

    stats = metrics.snapshot()[KEY]

    assert stats["count"] == WINDOW + 500
    assert stats["p99_ms"] == pytest.approx(1.0)
    (event,) = metrics.stats()
    assert len(event.durations) == WINDOW
    for _ in range(3 * WINDOW):
        record(metrics, 0.002)
    (event,) = metrics.stats()
    assert len(event.durations) == WINDOW
    assert metrics.snapshot()[KEY]["count"] == 4 * WINDOW + 500


def test_counts_outcomes_in_flight_and_retries() -> None:
    metrics = EventMetrics()
    for _ in range(3):
        metrics.started(KEY, NS, "send")
    assert metrics.snapshot()[KEY] == {
        "count": 0,
        "errors": 0,
        "retries": 0,
        "busy": 0,
        "in_flight": 3,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
    }
    metrics.retried(KEY)
    metrics.finished(KEY, 0.01, "ok")
    metrics.finished(KEY, 0.02, "error")
    metrics.finished(KEY, 0.03, "busy")
    metrics.pool_timeout()

    stats = metrics.snapshot()[KEY]

    assert (stats["count"], stats["errors"], stats["busy"], stats["retries"]) == (3, 1, 1, 1)
    assert stats["in_flight"] == 0
    assert (metrics.retries_total, metrics.pool_timeouts) == (1, 1)


def test_events_are_kept_apart_by_namespace_and_event() -> None:
    metrics = EventMetrics()
    record(metrics, 0.001, key="/a:send")
    record(metrics, 0.001, key="/b:send")
    record(metrics, 0.001, key="/a:list")
    record(metrics, 0.001, key="/a:send")

    snapshot = metrics.snapshot()

    assert {key: s["count"] for key, s in snapshot.items()} == {
        "/a:send": 2,
        "/b:send": 1,
        "/a:list": 1,
    }


def test_recording_from_many_threads_loses_nothing() -> None:
    metrics = EventMetrics()
    threads, per_thread = 8, 1000
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait(timeout=10)
        for n in range(per_thread):
            metrics.started(KEY, NS, "send")
            if n % 10 == 0:
                metrics.retried(KEY)
            metrics.finished(KEY, 0.001, "error" if n % 4 == 0 else "ok")

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    stats = metrics.snapshot()[KEY]
    assert stats["count"] == threads * per_thread
    assert stats["errors"] == threads * per_thread // 4
    assert stats["retries"] == metrics.retries_total == threads * per_thread // 10
    assert stats["in_flight"] == 0


# -- the Prometheus collector ----------------------------------------------------------

#: Every sample name the collector exposes, exactly as in the text format.
SAMPLE_NAMES = {
    "db_client_connection_count",
    "db_client_connection_max",
    "db_client_connection_pending_requests",
    "db_client_connection_timeouts_total",
    "socketio_dbctx_events_total",
    "socketio_dbctx_event_duration_seconds_bucket",
    "socketio_dbctx_event_duration_seconds_count",
    "socketio_dbctx_event_duration_seconds_sum",
    "socketio_dbctx_retries_total",
    "socketio_dbctx_leaks_total",
    "socketio_dbctx_pool_status",
}
TYPES = {
    "db_client_connection_count": "gauge",
    "db_client_connection_max": "gauge",
    "db_client_connection_pending_requests": "gauge",
    "db_client_connection_timeouts_total": "counter",
    "socketio_dbctx_events_total": "counter",
    "socketio_dbctx_event_duration_seconds": "histogram",
    "socketio_dbctx_retries_total": "counter",
    "socketio_dbctx_leaks_total": "counter",
    "socketio_dbctx_pool_status": "gauge",
}
LABELS = {
    "db_client_connection_count": {"pool_name", "state"},
    "db_client_connection_max": {"pool_name"},
    "db_client_connection_pending_requests": {"pool_name"},
    "db_client_connection_timeouts_total": {"pool_name"},
    "socketio_dbctx_events_total": {"namespace", "event", "outcome"},
    "socketio_dbctx_event_duration_seconds_bucket": {"namespace", "event", "le"},
    "socketio_dbctx_event_duration_seconds_count": {"namespace", "event"},
    "socketio_dbctx_event_duration_seconds_sum": {"namespace", "event"},
    "socketio_dbctx_retries_total": set(),
    "socketio_dbctx_leaks_total": set(),
    "socketio_dbctx_pool_status": {"pool_name", "status"},
}


def samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def type_lines(text: str) -> dict[str, str]:
    """``{name: type}`` from the ``# TYPE`` lines of the text format."""
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
    return types


class Scrape:
    """One app with a DBContext, a namespace and a collector on its own registry."""

    def __init__(self, app: Flask, db: SQLAlchemy, socketio: SocketIO) -> None:
        self.app = app
        self.dbctx = DBContext(app, socketio, db, retry_delay=0.001)
        self.registry = CollectorRegistry()
        self.collector = register(self.dbctx, app, self.registry)
        self.state = app_state(app, socketio)
        self.inside: dict[str, Any] = {}
        scrape = self

        class U(DBContextNamespace):
            calls = 0

            def on_ok(self) -> int:
                return int(db.session.execute(sa.text("SELECT 1")).scalar_one())

            def on_fail(self) -> None:
                raise RuntimeError("handler failed")

            def on_flaky(self) -> str:
                U.calls += 1
                if U.calls == 1:
                    raise sa.exc.OperationalError(
                        "SELECT 1", {}, Exception("connection lost"), connection_invalidated=True
                    )
                return "second time lucky"

            def on_timeout(self) -> None:
                raise sa.exc.TimeoutError("QueuePool limit of size 5 overflow 2 reached")

            def on_scrape(self) -> None:
                db.session.execute(sa.text("SELECT 1"))  # holds a connection now
                scrape.inside["text"] = scrape.text()

        socketio.on_namespace(U(NS))
        self.client = socketio.test_client(app, namespace=NS)

    def emit(self, event: str) -> Any:
        return self.client.emit(event, namespace=NS, callback=True)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def value(self, name: str, **labels: str) -> float | None:
        value: float | None = self.registry.get_sample_value(name, labels)
        return value


@pytest.fixture
def scrape(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> Iterator[Scrape]:
    scrape = Scrape(app, db, socketio)
    yield scrape
    scrape.client.disconnect(namespace=NS)


def test_metric_names_types_and_labels_are_exactly_the_documented_ones(scrape: Scrape) -> None:
    for event in ("ok", "fail", "flaky", "timeout"):
        scrape.emit(event)

    text = scrape.text()

    found = samples(text)
    assert {s.name for s in found} == SAMPLE_NAMES
    assert type_lines(text) == TYPES
    for sample in found:
        assert set(sample.labels) == LABELS[sample.name], sample
    states = {s.labels["state"] for s in found if s.name == "db_client_connection_count"}
    assert states == {"idle", "used"}


def test_values_after_test_client_events(scrape: Scrape) -> None:
    """2 ok, 1 failure, 1 retried then ok, 1 pool timeout (busy)."""
    assert scrape.emit("ok") == 1
    assert scrape.emit("ok") == 1
    assert scrape.emit("fail")["error"] == "internal_error"
    assert scrape.emit("flaky") == "second time lucky"
    assert scrape.emit("timeout")["error"] == "busy"

    def events(event: str, outcome: str) -> float | None:
        return scrape.value(
            "socketio_dbctx_events_total", namespace=NS, event=event, outcome=outcome
        )

    assert [events("ok", o) for o in ("ok", "error", "busy")] == [2, 0, 0]
    assert [events("fail", o) for o in ("ok", "error", "busy")] == [0, 1, 0]
    assert [events("flaky", o) for o in ("ok", "error", "busy")] == [1, 0, 0]
    assert [events("timeout", o) for o in ("ok", "error", "busy")] == [0, 0, 1]
    assert scrape.value("socketio_dbctx_retries_total") == 1
    assert scrape.value("db_client_connection_timeouts_total", pool_name="default") == 1
    assert scrape.value("socketio_dbctx_leaks_total") == 0
    # the app fixture's pool: 5 + overflow 2
    assert scrape.value("db_client_connection_max", pool_name="default") == 7
    assert scrape.value("db_client_connection_count", pool_name="default", state="used") == 0
    assert scrape.value("db_client_connection_pending_requests", pool_name="default") == 0
    for event, count in (("ok", 2), ("fail", 1), ("flaky", 1), ("timeout", 1)):
        labels = {"namespace": NS, "event": event}
        assert scrape.value("socketio_dbctx_event_duration_seconds_count", **labels) == count
        assert scrape.value("socketio_dbctx_event_duration_seconds_sum", **labels) > 0
        inf = scrape.value("socketio_dbctx_event_duration_seconds_bucket", **labels, le="+Inf")
        assert inf == count
    # the same numbers as the monitor's events mapping
    assert scrape.dbctx.metrics()[f"{NS}:flaky"]["retries"] == 1


def test_a_connection_in_use_shows_as_used(scrape: Scrape) -> None:
    scrape.emit("scrape")

    inside = {
        (s.labels["state"]): s.value
        for s in samples(scrape.inside["text"])
        if s.name == "db_client_connection_count"
    }
    assert inside["used"] == 1
    after = scrape.value("db_client_connection_count", pool_name="default", state="used")
    assert after == 0
    assert scrape.value("db_client_connection_count", pool_name="default", state="idle") >= 1


def test_histogram_buckets_are_cumulative_with_le_bounds(scrape: Scrape) -> None:
    """A duration equal to a bound counts in that bucket (``le``: less or equal)."""
    metrics = scrape.state.metrics
    durations = [0.005, 0.0051, 0.1, 0.3, 10.0, 11.0]
    for seconds in durations:
        record(metrics, seconds, key=f"{NS}:timed")

    def bucket(le: str) -> float | None:
        return scrape.value(
            "socketio_dbctx_event_duration_seconds_bucket", namespace=NS, event="timed", le=le
        )

    bounds = [*map(str, BUCKETS), "+Inf"]
    expected = {
        "0.005": 1,
        "0.01": 2,
        "0.05": 2,
        "0.1": 3,
        "0.25": 3,
        "0.5": 4,
        "10.0": 5,
        "+Inf": 6,
    }
    for le, count in expected.items():
        assert bucket(le) == count, le
    counts = [bucket(le) for le in bounds]
    assert counts == sorted(counts), counts  # cumulative
    assert scrape.value(
        "socketio_dbctx_event_duration_seconds_sum", namespace=NS, event="timed"
    ) == pytest.approx(sum(durations))


def test_collector_reads_at_scrape_time_and_registers_without_database_calls(
    app: Flask, db: SQLAlchemy, socketio: SocketIO
) -> None:
    dbctx = DBContext(app, socketio, db)
    registry = CollectorRegistry()
    with app.app_context():
        before = db.engine.pool.checkedin()  # type: ignore[attr-defined]

    collector = register(dbctx, app, registry)

    assert isinstance(collector, DBContextCollector)
    assert all(not metric.samples for metric in collector.describe())
    with app.app_context():
        assert db.engine.pool.checkedin() == before  # type: ignore[attr-defined]
    assert registry.get_sample_value("socketio_dbctx_retries_total") == 0
    record(app_state(app).metrics, 0.01, key="/late:event")
    late = {"namespace": "/late", "event": "event", "outcome": "ok"}
    assert registry.get_sample_value("socketio_dbctx_events_total", late) == 1


def test_pool_names_and_an_unbounded_pool(tmp_path: Any) -> None:
    """Each bind is a ``pool_name``; a pool without a bound has no ``_max``."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/default.db",
        SQLALCHEMY_BINDS={
            "other": {"url": f"sqlite:///{tmp_path}/other.db", "poolclass": NullPool}
        },
    )
    db = SQLAlchemy()
    db.init_app(app)
    dbctx = DBContext(app, None, db)
    registry = CollectorRegistry()
    register(dbctx, app, registry)
    try:
        found = samples(generate_latest(registry).decode())
    finally:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()

    def pools(name: str) -> set[str]:
        return {s.labels["pool_name"] for s in found if s.name == name}

    assert pools("db_client_connection_count") == {"default", "other"}
    assert pools("db_client_connection_pending_requests") == {"default", "other"}
    assert pools("db_client_connection_max") == {"default"}  # NullPool: no bound


def test_metrics_response_as_a_view_with_the_global_registry(
    app: Flask, db: SQLAlchemy, socketio: SocketIO
) -> None:
    """The documented wiring: ``register(dbctx, app)`` +
    ``app.add_url_rule("/metrics", "metrics", metrics_response)``."""
    dbctx = DBContext(app, socketio, db)
    collector = register(dbctx, app)
    try:
        app.add_url_rule("/metrics", "metrics", metrics_response)
        response = app.test_client().get("/metrics")
    finally:
        REGISTRY.unregister(collector)

    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    names = {s.name for s in samples(text)}
    assert {"db_client_connection_max", "socketio_dbctx_retries_total"} <= names
    assert 'db_client_connection_max{pool_name="default"} 7.0' in text


def test_metrics_response_with_a_registry_of_its_own(
    app: Flask, db: SQLAlchemy, socketio: SocketIO
) -> None:
    dbctx = DBContext(app, socketio, db)
    registry = CollectorRegistry()
    register(dbctx, app, registry)

    response = metrics_response(registry)

    assert response.status_code == 200
    assert {s.name for s in samples(response.get_data(as_text=True))} == SAMPLE_NAMES - {
        "socketio_dbctx_event_duration_seconds_bucket",
        "socketio_dbctx_event_duration_seconds_count",
        "socketio_dbctx_event_duration_seconds_sum",
        "socketio_dbctx_events_total",
    }  # no event yet: no event series


def test_registering_the_same_app_twice_on_one_registry_raises(
    app: Flask, db: SQLAlchemy, socketio: SocketIO
) -> None:
    """Like any prometheus_client collector whose names are taken already: a second
    registration must fail at once, not expose every series twice (an exposition
    Prometheus rejects: "second HELP line for metric name")."""
    dbctx = DBContext(app, socketio, db)
    registry = CollectorRegistry()
    register(dbctx, app, registry)

    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register(dbctx, app, registry)

    text = generate_latest(registry).decode()
    assert text.count("# TYPE db_client_connection_count gauge") == 1
