"""Leak detection (DESIGN section 7), in process: the test client, background and
periodic tasks, and ``session_scope``, with a short ``DBCTX_LEAK_THRESHOLD``.

A connection held past the threshold is logged once at WARNING, naming who took it
(the event label and sid, or ``task:<name>`` / ``periodic:<name>``) and where (a
stack line in this file); it is counted in ``long_held``, listed in the monitor's
``leaks``, and logged at INFO when it comes back. Threshold 0 turns all that off.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import sqlalchemy as sa
from conftest import checked_out, wait_for
from flask import Flask, current_app, request
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from prometheus_client import CollectorRegistry

from socketio_dbctx import DBContext, DBContextNamespace
from socketio_dbctx.prometheus import register
from socketio_dbctx.state import app_state

THRESHOLD = 0.2
TOKEN = "leak-token"
MON = "/monitor"
NS = "/leak"
LEAK = "apparent connection leak"
RETURNED = "connection reported as leaked was returned"


class Holder:
    """Takes a connection in whatever scope runs it, and keeps it until released."""

    def __init__(self) -> None:
        self.taken = threading.Event()
        self.release = threading.Event()
        self.line = 0
        self.sid: str | None = None


def hold_connection(holder: Holder) -> None:
    """The code under watch: its line taking the connection is where the leak is."""
    holder.line = sys._getframe().f_lineno + 1
    current_app.extensions["sqlalchemy"].session.execute(sa.text("SELECT 1"))
    holder.taken.set()
    assert holder.release.wait(30), "the test never released the connection"


class Setup:
    """An app with a DBContext, ``/leak`` (whose ``hold`` runs :func:`hold_connection`)
    and ``/monitor``, and a collector for ``socketio_dbctx_leaks_total``."""

    def __init__(
        self, app: Flask, db: SQLAlchemy, socketio: SocketIO, threshold: float = THRESHOLD
    ) -> None:
        self.app = app
        self.db = db
        self.dbctx = DBContext(app, socketio, db, leak_threshold=threshold, monitor_auth=TOKEN)
        self.registry = CollectorRegistry()
        register(self.dbctx, app, self.registry)
        self.holders: list[Holder] = []
        self.threads: list[threading.Thread] = []
        self.tasks: list[Any] = []  # periodic task handles
        setup = self

        class Leak(DBContextNamespace):
            def on_hold(self, index: int) -> bool:
                holder = setup.holders[index]
                holder.sid = request.sid  # type: ignore[attr-defined]
                hold_connection(holder)
                return True

        socketio.on_namespace(Leak(NS))
        #: where the handler is: what a leak inside an event points at
        self.handler_where = (__file__, inspect.getsourcelines(Leak.on_hold)[1], "on_hold")
        self.socketio = socketio
        self.monitor = socketio.test_client(app, namespace=MON, auth={"token": TOKEN})
        assert self.monitor.is_connected(MON)

    def holder(self) -> Holder:
        holder = Holder()
        self.holders.append(holder)
        return holder

    def in_thread(self, target: Callable[[], Any]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def status(self) -> dict[str, Any]:
        payload: dict[str, Any] = self.monitor.emit("get_status", namespace=MON, callback=True)
        return payload

    def pool(self) -> dict[str, Any]:
        with self.app.app_context():
            return self.dbctx.pool_status()

    def leaks_total(self) -> float | None:
        value: float | None = self.registry.get_sample_value("socketio_dbctx_leaks_total")
        return value

    def close(self) -> None:
        for holder in self.holders:
            holder.release.set()
        for task in self.tasks:
            task.stop(timeout=10)
        for thread in self.threads:
            thread.join(timeout=10)
        self.monitor.disconnect(namespace=MON)


@pytest.fixture(name="setup")
def setup_fixture(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> Iterator[Setup]:
    setup = Setup(app, db, socketio)
    yield setup
    setup.close()


def by_event(setup: Setup, holder: Holder) -> Callable[[], None]:
    """``hold`` through the test client, which runs it on the calling thread."""
    client = setup.socketio.test_client(setup.app, namespace=NS)
    index = setup.holders.index(holder)

    def run() -> None:
        try:
            assert client.emit("hold", index, namespace=NS, callback=True) is True
        finally:
            client.disconnect(namespace=NS)

    setup.in_thread(run)
    return lambda: None


def by_task(setup: Setup, holder: Holder) -> Callable[[], None]:
    setup.dbctx.start_background_task(hold_connection, holder)
    return lambda: None


def by_periodic(setup: Setup, holder: Holder) -> Callable[[], None]:
    task = setup.dbctx.start_periodic_task(hold_connection, 60.0, holder)
    setup.tasks.append(task)
    return lambda: task.stop(timeout=10) or None


def by_scope(setup: Setup, holder: Holder) -> Callable[[], None]:
    def run() -> None:
        with setup.dbctx.session_scope():
            hold_connection(holder)

    setup.in_thread(run)
    return lambda: None


Starter = Callable[[Setup, Holder], Callable[[], None]]

KINDS: list[tuple[Starter, str | None, bool]] = [
    # (how the connection is taken, its label (None: "/leak:hold"), whether a sid shows)
    (by_event, None, True),
    (by_task, "task:hold_connection", False),
    (by_periodic, "periodic:hold_connection", False),
    (by_scope, "scope", False),
]


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("socketio_dbctx") and text in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("start", "label", "has_sid"), KINDS, ids=["event", "task", "periodic", "scope"]
)
def test_leak_is_reported_once_then_cleared(
    setup: Setup,
    caplog: pytest.LogCaptureFixture,
    start: Starter,
    label: str | None,
    has_sid: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="socketio_dbctx")
    label = label or f"{NS}:hold"
    holder = setup.holder()
    stop = start(setup, holder)
    assert holder.taken.wait(10), "the connection was never taken"
    sid = holder.sid if has_sid else None
    if has_sid:
        assert sid

    # the watchdog reports it although nobody asks for a status
    warnings = wait_for(lambda: records(caplog, LEAK), 10, "the leak WARNING")
    (warning,) = warnings
    message = warning.getMessage()
    assert warning.levelno == logging.WARNING
    assert f"by {label} (sid {sid})" in message, message
    # where it was taken: inside an event, the handler (no stack walk per event);
    # elsewhere the line in this file that ran the query
    path, line, function = (
        setup.handler_where if has_sid else (__file__, holder.line, "hold_connection")
    )
    assert f'File "{path}", line {line}, in {function}' in message, message

    pool = setup.pool()
    assert (pool["checked_out"], pool["long_held"]) == (1, 1), pool
    status = setup.status()
    assert status["pools"]["default"]["long_held"] == 1
    assert [(leak["event"], leak["sid"]) for leak in status["leaks"]] == [(label, sid)]
    assert status["leaks"][0]["age_s"] >= THRESHOLD
    for _ in range(3):  # every scan lists it; none reports it again
        assert len(setup.status()["leaks"]) == 1
    assert len(records(caplog, LEAK)) == 1
    assert setup.leaks_total() == 1

    holder.release.set()
    returned = wait_for(lambda: records(caplog, RETURNED), 10, "the INFO on return")
    assert returned[0].levelno == logging.INFO
    assert f"by {label}, sid {sid})" in returned[0].getMessage()
    stop()
    wait_for(lambda: checked_out(setup.db, setup.app) == 0, 10, "the connection back")
    status = setup.status()
    assert status["leaks"] == [] and status["pools"]["default"]["long_held"] == 0
    assert setup.pool()["long_held"] == 0
    assert len(records(caplog, LEAK)) == 1 and len(records(caplog, RETURNED)) == 1
    assert setup.leaks_total() == 1


def test_leaks_are_listed_oldest_first(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="socketio_dbctx")
    older, newer = setup.holder(), setup.holder()
    by_task(setup, older)
    assert older.taken.wait(10)
    by_event(setup, newer)
    assert newer.taken.wait(10)

    wait_for(lambda: len(records(caplog, LEAK)) == 2, 10, "two leak WARNINGs")
    leaks = setup.status()["leaks"]

    assert [leak["event"] for leak in leaks] == ["task:hold_connection", f"{NS}:hold"]
    assert leaks[0]["age_s"] >= leaks[1]["age_s"]
    assert setup.pool()["long_held"] == 2
    assert setup.leaks_total() == 2
    older.release.set()
    newer.release.set()
    wait_for(lambda: len(records(caplog, RETURNED)) == 2, 10, "both INFOs on return")
    wait_for(lambda: checked_out(setup.db, setup.app) == 0, 10, "the connections back")


def test_threshold_zero_turns_detection_off(
    app: Flask, db: SQLAlchemy, socketio: SocketIO, caplog: pytest.LogCaptureFixture
) -> None:
    """No stack is captured, nothing is reported, however long the connection is out."""
    caplog.set_level(logging.DEBUG, logger="socketio_dbctx")
    setup = Setup(app, db, socketio, threshold=0)
    try:
        holder = setup.holder()
        by_scope(setup, holder)
        assert holder.taken.wait(10)
        state = app_state(app)
        with app.app_context():
            (checkout,) = state.tracker.checkouts(db.engine)
        assert checkout.stack is None
        assert checkout.label == "scope"  # still followed, for the pool counts

        # out for longer than any threshold the other tests use
        wait_for(lambda: checkout.age() > 5 * THRESHOLD, 10, "the connection to be out long")
        status = setup.status()
        assert status["leaks"] == []
        assert status["pools"]["default"]["long_held"] == 0
        assert status["pools"]["default"]["checked_out"] == 1
        assert state.tracker.scan() == []
        holder.release.set()
        wait_for(lambda: checked_out(db, app) == 0, 10, "the connection back")
    finally:
        setup.close()

    assert records(caplog, LEAK) == [] and records(caplog, RETURNED) == []
    assert setup.leaks_total() == 0


def test_short_checkouts_are_not_reported(
    app: Flask, db: SQLAlchemy, socketio: SocketIO, caplog: pytest.LogCaptureFixture
) -> None:
    """With a threshold far above how long the events take, nothing is reported."""
    caplog.set_level(logging.INFO, logger="socketio_dbctx")
    setup = Setup(app, db, socketio, threshold=30)
    try:
        for _ in range(5):
            with setup.dbctx.session_scope() as session:
                session.execute(sa.text("SELECT 1"))
        status = setup.status()
    finally:
        setup.close()

    assert status["leaks"] == [] and status["pools"]["default"]["long_held"] == 0
    assert records(caplog, LEAK) == [] and records(caplog, RETURNED) == []
    assert setup.leaks_total() == 0


def test_leak_stack_starts_at_the_code_that_took_the_connection(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """The stack is "the caller's innermost frames outside SQLAlchemy and this
    package": its first line is the one that ran the query, not a frame of SQLAlchemy
    (such as its generated ``<sqlalchemy generated _go() wrapper ...>`` functions)."""
    caplog.set_level(logging.INFO, logger="socketio_dbctx")
    holder = setup.holder()
    by_scope(setup, holder)
    assert holder.taken.wait(10)

    (warning,) = wait_for(lambda: records(caplog, LEAK), 10, "the leak WARNING")
    holder.release.set()

    frames = [line.strip() for line in warning.getMessage().splitlines() if "File " in line]
    assert frames, warning.getMessage()
    assert frames[0] == f'File "{__file__}", line {holder.line}, in hold_connection', frames
    assert not any("sqlalchemy" in frame.lower() for frame in frames), frames


def _wait_for_checkout(engine: sa.Engine, outcome: list[str]) -> threading.Thread:
    def take() -> None:
        try:
            engine.connect().close()
            outcome.append("got one")
        except sa.exc.TimeoutError:
            outcome.append("timed out")

    thread = threading.Thread(target=take)
    thread.start()
    return thread


@pytest.mark.parametrize("disposed", [False, True], ids=["pool", "after-dispose"])
def test_one_checkout_waiting_on_a_full_pool_counts_once(tmp_path: Any, disposed: bool) -> None:
    """``waiting`` counts a checkout blocked on a full ``QueuePool`` exactly once, and
    keeps counting after ``engine.dispose()`` replaced the pool (this pins the
    private ``QueuePool._pool.get`` that socketio_dbctx.leaks wraps, on the installed
    SQLAlchemy)."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'w.db'}"
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        "poolclass": sa.pool.QueuePool,
        "pool_size": 1,
        "max_overflow": 0,
        "pool_timeout": 2,
    }
    db = SQLAlchemy(app)
    dbctx = DBContext(app, None, db, leak_threshold=0)
    with app.app_context():
        engine = db.engine
    if disposed:
        engine.dispose()
    held = engine.connect()
    outcome: list[str] = []
    waiter = _wait_for_checkout(engine, outcome)
    wait_for(lambda: dbctx.pool_status()["waiting"] == 1, timeout=5, message="one waiter counted")
    assert dbctx.pool_status()["waiting"] == 1
    held.close()
    waiter.join(5)
    assert outcome == ["got one"]
    assert dbctx.pool_status()["waiting"] == 0
    assert dbctx.pool_status()["checked_out"] == 0
