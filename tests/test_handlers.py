"""Function handlers (``@dbctx.on``, ``dbctx.on_event``), ``DBCTX_WRAP_ALL_HANDLERS``,
the app's error handlers and ``self.db_session`` / ``self.session(sid)``, driven
through Flask-SocketIO's test client (events run one at a time on this thread)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ALL_DATABASES, checked_out, stored_names
from eventkit import InProcess
from flask import Flask, request
from flask_socketio import Namespace, SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import (
    ContextSetupError,
    DBContext,
    DBContextNamespace,
    InvalidRequestError,
    no_retry,
)

NS = "/f"


_TEST_CLIENTS = InProcess(NS)
call = _TEST_CLIENTS.call
client_of = _TEST_CLIENTS.client_of


@pytest.fixture
def dbctx(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> DBContext:
    return DBContext(app, socketio, db, retry_delay=0)


# -- @dbctx.on and on_event ----------------------------------------------------------------


@ALL_DATABASES
def test_function_handler_commits_before_the_ack_in_a_fresh_session(
    app, db, socketio, dbctx, Item, url
):
    sessions: list[Any] = []

    @dbctx.on("add", namespace=NS)
    def add(data):
        sessions.append(db.session())
        db.session.add(Item(name=data["name"]))
        return {"ok": True, "sid": request.sid, "namespace": request.namespace}

    client = client_of(socketio, app)
    first = call(client, "add", {"name": "a"})
    call(client, "add", {"name": "b"})
    assert first["ok"] is True and first["namespace"] == NS and first["sid"]
    assert stored_names(url) == ["a", "b"]
    assert sessions[0] is not sessions[1]
    assert checked_out(db, app) == 0
    assert dbctx.metrics()[f"{NS}:add"]["count"] == 2


@ALL_DATABASES
def test_function_handler_failure_rolls_back_and_acks_a_payload(
    app, db, socketio, dbctx, Item, url
):
    @dbctx.on("add", namespace=NS)
    def add(name):
        db.session.add(Item(name=name))
        db.session.flush()
        raise RuntimeError("secret detail")

    ack = call(client_of(socketio, app), "add", "x")
    assert ack == {
        "error": "internal_error",
        "message": "The server could not process this event.",
        "retryable": False,
    }
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


def test_wrong_argument_count_is_refused_before_the_function_runs(app, db, socketio, dbctx):
    calls: list[Any] = []

    def add(a, b=None):
        calls.append((a, b))
        return "ran"

    dbctx.on_event("add", add, namespace=NS)
    client = client_of(socketio, app)
    ack = call(client, "add", 1, 2, 3)
    assert ack["error"] == "invalid_request"
    assert "add takes 1 to 2 argument(s), got 3" in ack["message"]
    assert calls == []
    assert call(client, "add", 1) == "ran"


def test_handler_decorators_stack_under_dbctx_on(app, db, socketio, dbctx):
    runs: list[int] = []

    @dbctx.on("flaky", namespace=NS)
    @no_retry
    def flaky():
        runs.append(1)
        raise sa.exc.OperationalError(
            "SELECT 1", {}, Exception("connection lost"), connection_invalidated=True
        )

    ack = call(client_of(socketio, app), "flaky")
    assert ack["error"] == "db_unavailable"
    assert runs == [1]  # not retried


def test_catch_all_event_gets_the_event_name(app, db, socketio, dbctx, Item, url):
    @dbctx.on("*", namespace=NS)
    def anything(event, *args):
        db.session.add(Item(name=f"{event}:{len(args)}"))
        return event

    client = client_of(socketio, app)
    assert call(client, "hello", 1, 2) == "hello"
    assert stored_names(url) == ["hello:2"]


def test_connect_function_gets_auth_and_refuses(app, db, socketio, dbctx):
    seen: list[Any] = []

    @dbctx.on("connect", namespace=NS)
    def on_connect(auth):
        seen.append(auth)
        return auth != {"let_in": False}

    assert socketio.test_client(app, namespace=NS, auth={"let_in": True}).is_connected(NS)
    refused = socketio.test_client(app, namespace=NS, auth={"let_in": False})
    assert not refused.is_connected(NS)
    assert seen == [{"let_in": True}, {"let_in": False}]


def test_on_event_needs_a_socketio_and_a_callable(app, db):
    lonely = DBContext(app, None, db)
    with pytest.raises(ContextSetupError, match=r"DBContext\(app, socketio, db\)"):
        lonely.on_event("x", lambda: None)
    with pytest.raises(ValueError, match="handler must be callable"):
        lonely.on_event("x", "not a function")  # type: ignore[arg-type]


# -- DBCTX_WRAP_ALL_HANDLERS ------------------------------------------------------------------


@pytest.mark.parametrize("registered", ["before", "after"])
def test_wrap_all_pipes_existing_socketio_handlers(app, db, socketio, Item, url, registered):
    app.config["DBCTX_WRAP_ALL_HANDLERS"] = True

    def add(name):
        db.session.add(Item(name=name))
        if name == "bad":
            raise InvalidRequestError("bad name")
        return "ok"

    if registered == "before":
        socketio.on("add", namespace=NS)(add)
        DBContext(app, socketio, db)
    else:
        DBContext(app, socketio, db)
        socketio.on_event("add", add, namespace=NS)
    client = client_of(socketio, app)
    assert call(client, "add", "good") == "ok"
    assert call(client, "add", "bad")["error"] == "invalid_request"
    assert stored_names(url) == ["good"]  # committed once, the failing one rolled back
    assert checked_out(db, app) == 0


def test_wrap_all_pipes_plain_namespace_classes(app, db, socketio, Item, url):
    app.config["DBCTX_WRAP_ALL_HANDLERS"] = True
    DBContext(app, socketio, db)

    class Plain(Namespace):
        def on_add(self, name):
            db.session.add(Item(name=name))
            return 1 // 0 if name == "boom" else "ok"

    socketio.on_namespace(Plain(NS))
    client = client_of(socketio, app)
    assert call(client, "add", "kept") == "ok"
    assert call(client, "add", "boom")["error"] == "internal_error"
    assert stored_names(url) == ["kept"]


def test_without_wrap_all_plain_handlers_are_left_alone(app, db, socketio, dbctx):
    @socketio.on("add", namespace=NS)
    def add():
        raise RuntimeError("plain Flask-SocketIO raises")

    with pytest.raises(RuntimeError, match="plain Flask-SocketIO raises"):
        call(client_of(socketio, app), "add")
    assert f"{NS}:add" not in dbctx.metrics()


def test_wrap_all_leaves_the_monitor_outside(app, db, socketio):
    app.config.update(DBCTX_WRAP_ALL_HANDLERS=True, DBCTX_MONITOR_AUTH="t")
    dbctx = DBContext(app, socketio, db)
    monitor = socketio.test_client(app, namespace="/monitor", auth={"token": "t"})
    assert monitor.is_connected("/monitor")
    status = call(monitor, "get_status", namespace="/monitor")
    assert status["pools"]["default"]["checked_out"] == 0
    assert "/monitor:get_status" not in dbctx.metrics()


# -- error handlers ----------------------------------------------------------------------------


def failing_namespace(db: SQLAlchemy, Item: Any, own_error: bool) -> type[DBContextNamespace]:
    class Failing(DBContextNamespace):
        def on_add(self, name):
            db.session.add(Item(name=name))
            raise KeyError(name)

    if own_error:

        def error(self, exc):
            db.session.add(Item(name=f"own:{type(exc).__name__}"))
            return {"handled_by": "namespace", "sid": request.sid}

        Failing.error = error  # type: ignore[attr-defined]
    return Failing


@pytest.mark.parametrize(
    ("own", "for_namespace", "default", "expected"),
    [
        (True, True, True, "namespace"),
        (False, True, True, "on_error"),
        (False, False, True, "on_error_default"),
        (False, False, False, None),
    ],
)
def test_error_handlers_are_tried_in_flask_socketio_order(
    app, db, socketio, dbctx, Item, url, own, for_namespace, default, expected
):
    if for_namespace:

        @socketio.on_error(NS)
        def for_ns(exc):
            db.session.add(Item(name=f"ns:{type(exc).__name__}"))
            return {"handled_by": "on_error", "event": request.event["message"]}

    if default:

        @socketio.on_error_default
        def fallback(exc):
            return {"handled_by": "on_error_default", "namespace": request.namespace}

    socketio.on_namespace(failing_namespace(db, Item, own)(NS))
    ack = call(client_of(socketio, app), "add", "lost")
    if expected is None:
        assert ack["error"] == "internal_error"
    else:
        assert ack["handled_by"] == expected
    if expected == "on_error":
        assert ack["event"] == "add"
        assert stored_names(url) == ["ns:KeyError"]  # its own scope, committed
    elif expected == "namespace":
        assert stored_names(url) == ["own:KeyError"]
    else:
        assert stored_names(url) == []  # the failed event's row rolled back
    assert checked_out(db, app) == 0


def test_error_handler_of_a_function_handler(app, db, socketio, dbctx):
    @socketio.on_error_default
    def report(exc):
        return {"reported": str(exc), "sid": request.sid}

    @dbctx.on("fail", namespace=NS)
    def fail():
        raise ValueError("nope")

    ack = call(client_of(socketio, app), "fail")
    assert ack["reported"] == "nope" and ack["sid"]


def test_a_raising_error_handler_falls_back_to_the_payload(
    app, db, socketio, dbctx, caplog: pytest.LogCaptureFixture
):
    @socketio.on_error(NS)
    def broken(exc):
        raise RuntimeError("the error handler broke")

    @dbctx.on("fail", namespace=NS)
    def fail():
        raise ValueError("original")

    ack = call(client_of(socketio, app), "fail")
    assert ack["error"] == "internal_error"
    assert "the error handler broke" in caplog.text


# -- db_session and python-socketio's session(sid) ---------------------------------------------


def test_db_session_is_the_events_session_and_session_is_python_socketios(
    app, db, socketio, dbctx
):
    """``self.session`` stays python-socketio's ``session(sid)`` context manager (it needs
    a real Engine.IO session, so tests/test_parity.py uses it on real servers)."""
    import socketio as python_socketio

    assert DBContextNamespace.session is python_socketio.Namespace.session
    assert DBContextNamespace.get_session is python_socketio.Namespace.get_session

    class Chat(DBContextNamespace):
        def on_probe(self):
            return self.db_session is db.session()

    socketio.on_namespace(Chat(NS))
    assert call(client_of(socketio, app), "probe") is True
