"""Semantics of DBContextNamespace, driven through Flask-SocketIO's test client.

The test client runs every event on the calling thread, so each assertion after
``client.emit(...)`` sees the state right after the event finished.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import socketio as python_socketio
import sqlalchemy as sa
from conftest import ALL_DATABASES, checked_out, stored_names
from flask import Flask, has_app_context, request
from flask.globals import app_ctx
from flask_socketio import ConnectionRefusedError as SocketIORefused
from flask_socketio import Namespace, SocketIO
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

from socketio_dbctx import (
    ContextSetupError,
    DBContext,
    DBContextNamespace,
    InvalidRequestError,
)

NS = "/t"

SECRET = "s3cret-internal-detail"


# -- helpers -----------------------------------------------------------------------------


def connect(socketio: SocketIO, app: Flask, namespace: type[Namespace] | Namespace, **kw: Any):
    if isinstance(namespace, type):
        namespace = namespace(NS)
    socketio.on_namespace(namespace)
    return socketio.test_client(app, namespace=NS, **kw)


def call(client: Any, event: str, *args: Any) -> Any:
    return client.emit(event, *args, namespace=NS, callback=True)


@pytest.fixture
def dbctx(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> DBContext:
    return DBContext(app, socketio, db, retry_delay=0)


# -- commit / rollback / acks ------------------------------------------------------------


@ALL_DATABASES
def test_commit_on_success_happens_before_the_ack(app, db, socketio, dbctx, Item, url):
    class Chat(DBContextNamespace):
        def on_add(self, data):
            db.session.add(Item(name=data["name"]))
            return {"ok": True}

    client = connect(socketio, app, Chat)
    # Spy on the transport (Flask-SocketIO's test client hook): when the ACK packet
    # leaves the server, read the table over a separate connection.
    seen_at_ack: list[list[str]] = []
    send = socketio.server._send_packet

    def spy(eio_sid: str, pkt: Any) -> None:
        if pkt.packet_type == python_socketio.packet.ACK:
            seen_at_ack.append(stored_names(url))
        send(eio_sid, pkt)

    socketio.server._send_packet = spy
    assert call(client, "add", {"name": "first"}) == {"ok": True}
    assert seen_at_ack == [["first"]]
    assert stored_names(url) == ["first"]
    assert checked_out(db, app) == 0


@ALL_DATABASES
def test_rollback_on_error_acks_internal_error_without_exception_text(
    app, db, socketio, dbctx, Item, url, caplog
):
    class Chat(DBContextNamespace):
        def on_add(self, data):
            db.session.add(Item(name=data["name"]))
            db.session.flush()  # the row reached the database inside the transaction
            raise RuntimeError(f"boom {SECRET}")

    client = connect(socketio, app, Chat)
    with caplog.at_level(logging.ERROR, logger="socketio_dbctx"):
        ack = call(client, "add", {"name": "doomed"})
    assert set(ack) == {"error", "message", "retryable"}
    assert ack["error"] == "internal_error"
    assert ack["retryable"] is False
    assert isinstance(ack["message"], str) and ack["message"]
    assert SECRET not in repr(ack) and "RuntimeError" not in repr(ack)
    assert stored_names(url) == []
    assert checked_out(db, app) == 0
    # the traceback goes to the log instead
    logged = [r for r in caplog.records if r.exc_info and SECRET in str(r.exc_info[1])]
    assert logged, "the failure should be logged with its traceback"


@pytest.mark.parametrize("how", ["app_config", "class_attribute"])
def test_expose_errors_adds_detail(app, db, socketio, Item, url, how):
    if how == "app_config":
        app.config["DBCTX_EXPOSE_ERRORS"] = True
    DBContext(app, socketio, db)

    class Chat(DBContextNamespace):
        if how == "class_attribute":
            expose_errors = True

        def on_add(self, data):
            db.session.add(Item(name=data["name"]))
            raise RuntimeError(f"boom {SECRET}")

    client = connect(socketio, app, Chat)
    ack = call(client, "add", {"name": "doomed"})
    assert ack["error"] == "internal_error"
    assert ack["retryable"] is False
    assert SECRET in ack["detail"]
    assert SECRET not in ack["message"]
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


@ALL_DATABASES
def test_self_session_is_db_session_and_fresh_context(app, db, socketio, dbctx, Item):
    class Chat(DBContextNamespace):
        def on_probe(self):
            return {
                "same": self.db_session is db.session(),
                "ctx": has_app_context(),
                "sid": request.sid,
                "namespace": request.namespace,
            }

    client = connect(socketio, app, Chat)
    ack = call(client, "probe")
    assert ack["same"] is True
    assert ack["ctx"] is True
    assert ack["namespace"] == NS
    assert ack["sid"] == socketio.server.manager.sid_from_eio_sid(client.eio_sid, NS)
    assert checked_out(db, app) == 0


def test_db_session_outside_an_event_raises(app, db, socketio, dbctx):
    ns = DBContextNamespace(NS)
    with pytest.raises(ContextSetupError):
        _ = ns.db_session


@pytest.mark.parametrize(
    ("base", "expect_same_session", "expect_checked_out"),
    [(Namespace, True, 1), (DBContextNamespace, False, 0)],
    ids=["plain_namespace_control", "dbcontext_namespace"],
)
@ALL_DATABASES
def test_fresh_session_per_event_inside_outer_app_context(
    app, db, socketio, Item, url, base, expect_same_session, expect_checked_out
):
    """An outer ``with app.app_context():`` makes Flask 3.1 reuse that context for every
    event; Flask-SQLAlchemy then hands every event the same session, never removed."""
    sessions: list[Any] = []  # keep them alive, so identities cannot be reused

    class Probe(base):  # type: ignore[misc,valid-type]
        def on_add(self, name):
            db.session.add(Item(name=name))
            db.session.flush()  # takes a connection from the pool
            sessions.append(db.session())
            if base is Namespace:
                return None  # the plain namespace never commits: that is the point
            return name

    after_each: list[int] = []
    with app.app_context():
        outer_session = db.session()
        client = connect(socketio, app, Probe)
        for i in range(3):
            call(client, "add", f"row{i}")
            after_each.append(checked_out(db, app))
        same = all(s is sessions[0] for s in sessions)
        assert (sessions[0] is outer_session) is expect_same_session
    assert len(sessions) == 3
    assert same is expect_same_session
    assert after_each == [expect_checked_out] * 3
    if base is DBContextNamespace:
        assert stored_names(url) == ["row0", "row1", "row2"]
    # leaving the outer context finally releases the control's session
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("outer_context", [False, True], ids=["no_outer", "outer_context"])
def test_a_session_made_but_never_used_is_removed_after_the_event(
    app, db, socketio, dbctx, outer_context
):
    """A session that never began a transaction is left to Flask-SQLAlchemy's teardown
    of the event's app context: it is gone from the registry all the same, and a
    session that did begin one is closed before the ack."""
    made: list[Any] = []

    class Probe(DBContextNamespace):
        def on_touch(self):
            session = db.session()  # made, no transaction begun
            made.append(session)
            return session.in_transaction()

        def on_read(self):
            db.session.execute(sa.text("SELECT 1"))
            made.append(db.session())
            return True

    def run() -> None:
        client = connect(socketio, app, Probe)
        assert call(client, "touch") is False
        assert call(client, "read") is True
        # the read's session was closed: its transaction ended, its connection is back
        assert not made[-1].in_transaction()
        assert checked_out(db, app) == 0

    if outer_context:
        with app.app_context():
            outer = db.session()
            run()
            # the outer context's own session is untouched, and is not the events' one
            assert db.session() is outer and outer not in made
    else:
        run()
        assert not db.session.registry.registry
    assert len(made) == 2 and made[0] is not made[1]


# -- error() hook ------------------------------------------------------------------------


def test_error_hook_runs_inside_the_events_context_and_its_value_is_the_ack(
    app, db, socketio, dbctx, Item, url
):
    seen: list[dict[str, Any]] = []

    class Chat(DBContextNamespace):
        def on_add(self, name):
            db.session.add(Item(name=name))
            db.session.flush()
            raise ValueError(SECRET)

        def on_whoami(self):
            return request.sid

        def error(self, exc):
            seen.append(
                {
                    "exc": exc,
                    "sid": request.sid,
                    "ctx": has_app_context(),
                    # the failed handler's row was rolled back before error() ran
                    "rows": self.db_session.scalar(sa.select(sa.func.count()).select_from(Item)),
                    "same": self.db_session is db.session(),
                }
            )
            return {"custom": type(exc).__name__}

    client = connect(socketio, app, Chat)
    sid = call(client, "whoami")
    assert call(client, "add", "x") == {"custom": "ValueError"}
    assert len(seen) == 1
    assert isinstance(seen[0]["exc"], ValueError)
    assert seen[0]["sid"] == sid
    assert seen[0]["ctx"] is True
    assert seen[0]["rows"] == 0
    assert seen[0]["same"] is True
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


def test_error_hook_that_raises_falls_back_to_the_payload(
    app, db, socketio, dbctx, Item, url, caplog
):
    calls = {"error": 0}

    class Chat(DBContextNamespace):
        def on_add(self, name):
            db.session.add(Item(name=name))
            raise RuntimeError(SECRET)

        def error(self, exc):
            calls["error"] += 1
            raise KeyError("error hook broke")

    client = connect(socketio, app, Chat)
    with caplog.at_level(logging.ERROR, logger="socketio_dbctx"):
        ack = call(client, "add", "x")
    assert calls["error"] == 1
    assert ack == {
        "error": "internal_error",
        "message": ack["message"],
        "retryable": False,
    }
    assert SECRET not in repr(ack)
    assert stored_names(url) == []
    assert checked_out(db, app) == 0
    assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in caplog.records)


# -- argument checking -------------------------------------------------------------------


class Arity(DBContextNamespace):
    calls: dict[str, int]

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)
        self.calls = {}

    def _hit(self, name: str) -> str:
        self.calls[name] = self.calls.get(name, 0) + 1
        return "ok"

    def on_none(self):
        return self._hit("none")

    def on_one(self, a):
        return self._hit("one")

    def on_two(self, a, b):
        return self._hit("two")

    def on_opt(self, a, b=2):
        return self._hit("opt")

    def on_var(self, a, *rest):
        return self._hit("var")

    def on_kwonly(self, *, key):
        return self._hit("kwonly")


@pytest.mark.parametrize(
    ("event", "args", "accepted"),
    [
        ("none", (), True),
        ("none", (1,), False),
        ("one", (1,), True),
        ("one", (), False),
        ("one", (1, 2), False),
        ("two", (1, 2), True),
        ("two", (1,), False),
        ("two", (1, 2, 3), False),
        ("opt", (1,), True),
        ("opt", (1, 2), True),
        ("opt", (), False),
        ("opt", (1, 2, 3), False),
        ("var", (1,), True),
        ("var", (1, 2, 3, 4, 5), True),
        ("var", (), False),
        ("kwonly", (), False),
        ("kwonly", (1,), False),
    ],
)
def test_arity_is_checked_before_the_handler_runs(app, db, socketio, dbctx, event, args, accepted):
    ns = Arity(NS)
    client = connect(socketio, app, ns)
    ack = call(client, event, *args)
    if accepted:
        assert ack == "ok"
        assert ns.calls == {event: 1}
    else:
        assert ack["error"] == "invalid_request"
        assert ack["retryable"] is False
        assert isinstance(ack["message"], str) and ack["message"]
        assert ns.calls == {}, "the handler must not be called"
    assert checked_out(db, app) == 0


def test_invalid_request_error_from_the_handler(app, db, socketio, dbctx, Item, url):
    class Orders(DBContextNamespace):
        def on_place(self, data):
            db.session.add(Item(name="half-done"))
            db.session.flush()
            if data["qty"] <= 0:
                raise InvalidRequestError("qty must be > 0")
            return {"ok": True}

    client = connect(socketio, app, Orders)
    ack = call(client, "place", {"qty": 0})
    assert ack == {"error": "invalid_request", "message": "qty must be > 0", "retryable": False}
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


# -- connect / disconnect ----------------------------------------------------------------


@pytest.mark.parametrize("with_error_hook", [False, True], ids=["no_error_hook", "error_hook"])
@pytest.mark.parametrize("how", ["socketio_refused", "builtin_refused", "return_false"])
def test_connect_can_be_refused(app, db, socketio, dbctx, Item, url, how, with_error_hook):
    calls = {"connect": 0, "error": 0}

    class Guarded(DBContextNamespace):
        def on_connect(self, auth):
            calls["connect"] += 1
            db.session.add(Item(name="from-connect"))
            db.session.flush()
            if how == "socketio_refused":
                raise SocketIORefused("go away")
            if how == "builtin_refused":
                raise ConnectionRefusedError("go away")
            return False

        if with_error_hook:

            def error(self, exc):
                calls["error"] += 1
                return {"custom": True}

    client = connect(socketio, app, Guarded, auth={"token": "wrong"})
    assert client.is_connected(NS) is False
    assert calls["connect"] == 1
    if how != "return_false":
        assert stored_names(url) == []
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("with_error_hook", [False, True], ids=["no_error_hook", "error_hook"])
@pytest.mark.parametrize("auth", [None, {"token": "t"}], ids=["no_auth", "auth"])
def test_type_error_in_connect_refuses_once(app, db, socketio, dbctx, auth, with_error_hook):
    calls = {"connect": 0}

    class Broken(DBContextNamespace):
        def on_connect(self, auth):
            calls["connect"] += 1
            raise TypeError("bug inside the connect handler")

        if with_error_hook:

            def error(self, exc):
                return None

    client = connect(socketio, app, Broken, auth=auth)
    assert calls["connect"] == 1, "a TypeError must not make anyone re-run the handler"
    assert client.is_connected(NS) is False
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("auth", [None, {"token": "t"}], ids=["no_auth", "auth"])
def test_connect_handlers_with_and_without_auth(app, db, socketio, dbctx, Item, url, auth):
    received: list[Any] = []

    class WithAuth(DBContextNamespace):
        def on_connect(self, auth):
            received.append(auth)
            db.session.add(Item(name="with-auth"))

    class NoAuth(DBContextNamespace):
        def on_connect(self):
            received.append("called")
            db.session.add(Item(name="no-auth"))

    socketio.on_namespace(WithAuth("/a"))
    socketio.on_namespace(NoAuth("/b"))
    client = socketio.test_client(app, namespace="/a", auth=auth)
    client.connect(namespace="/b", auth=auth)
    assert client.is_connected("/a") and client.is_connected("/b")
    assert received == [auth, "called"]
    # connect handlers run in their own committed scope too
    assert stored_names(url) == ["no-auth", "with-auth"]
    assert checked_out(db, app) == 0


def test_disconnect_handlers_with_and_without_reason(app, db, socketio, dbctx, Item, url):
    received: list[Any] = []

    class WithReason(DBContextNamespace):
        def on_disconnect(self, reason):
            received.append(reason)
            db.session.add(Item(name="with-reason"))

    class NoReason(DBContextNamespace):
        def on_disconnect(self):
            received.append("called")
            db.session.add(Item(name="no-reason"))

    socketio.on_namespace(WithReason("/a"))
    socketio.on_namespace(NoReason("/b"))
    client = socketio.test_client(app, namespace="/a")
    client.connect(namespace="/b")
    client.disconnect(namespace="/a")
    client.disconnect(namespace="/b")
    assert received == [python_socketio.Server.reason.CLIENT_DISCONNECT, "called"]
    assert stored_names(url) == ["no-reason", "with-reason"]
    assert checked_out(db, app) == 0


def test_failing_disconnect_handler_is_rolled_back_and_contained(
    app, db, socketio, dbctx, Item, url, caplog
):
    calls = {"n": 0}

    class Chat(DBContextNamespace):
        def on_disconnect(self, reason):
            calls["n"] += 1
            db.session.add(Item(name="from-disconnect"))
            db.session.flush()
            raise RuntimeError(SECRET)

    client = connect(socketio, app, Chat)
    with caplog.at_level(logging.ERROR, logger="socketio_dbctx"):
        client.disconnect(namespace=NS)
    assert calls["n"] == 1
    assert not client.is_connected(NS)
    assert stored_names(url) == []
    assert checked_out(db, app) == 0
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records)


# -- per-namespace overrides -------------------------------------------------------------


@ALL_DATABASES
def test_commit_on_success_false_stores_only_what_the_handler_commits(
    app, db, socketio, dbctx, Item, url
):
    class Manual(DBContextNamespace):
        commit_on_success = False

        def on_add(self, name):
            self.db_session.add(Item(name=name))
            return "added"

        def on_add_and_commit(self, name):
            self.db_session.add(Item(name=name))
            self.db_session.commit()
            return "committed"

    client = connect(socketio, app, Manual)
    assert call(client, "add", "not-stored") == "added"
    assert stored_names(url) == []
    assert call(client, "add_and_commit", "stored") == "committed"
    assert stored_names(url) == ["stored"]
    assert checked_out(db, app) == 0


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        ("commit_on_success", "yes"),
        ("commit_on_success", 1),
        ("expose_errors", "true"),
        ("max_retries", -1),
        ("max_retries", 1.5),
        ("max_retries", True),
        ("retry_delay", -0.1),
        ("retry_delay", float("nan")),
        ("retry_max_delay", "2"),
        ("queue_timeout", -1),
        ("max_in_flight_per_client", -3),
    ],
)
def test_invalid_class_attribute_override_raises_at_first_event(
    app, db, socketio, dbctx, Item, url, attr, value
):
    calls = {"n": 0}

    class Bad(DBContextNamespace):
        def on_add(self, name):
            calls["n"] += 1
            db.session.add(Item(name=name))
            return "ok"

    setattr(Bad, attr, value)
    client = connect(socketio, app, Bad)
    with pytest.raises(ContextSetupError, match=attr.upper()):
        call(client, "add", "x")
    assert calls["n"] == 0
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


# -- extra_middleware --------------------------------------------------------------------


def test_extra_middleware_runs_inside_the_events_context(app, db, socketio, dbctx, Item, url):
    seen: list[dict[str, Any]] = []

    def inspect_event(event, call_next):
        seen.append(
            {
                "namespace": event.namespace,
                "name": event.name,
                "sid": event.sid,
                "args": tuple(event.args),
                "attempt": event.attempt,
                "ctx": has_app_context(),
                "request_sid": request.sid,
            }
        )
        db.session.add(Item(name="from-middleware"))  # the event's own session
        handler_sessions.append(db.session())
        return call_next()

    handler_sessions: list[Any] = []

    class Chat(DBContextNamespace):
        extra_middleware = (inspect_event,)

        def on_add(self, name, extra):
            handler_sessions.append(self.db_session)
            db.session.add(Item(name=name))
            return "ok"

    client = connect(socketio, app, Chat)
    assert call(client, "add", "from-handler", {"k": 1}) == "ok"
    sid = socketio.server.manager.sid_from_eio_sid(client.eio_sid, NS)
    assert seen == [
        {
            "namespace": NS,
            "name": "add",
            "sid": sid,
            "args": ("from-handler", {"k": 1}),
            "attempt": 1,
            "ctx": True,
            "request_sid": sid,
        }
    ]
    assert handler_sessions[0] is handler_sessions[1]
    assert stored_names(url) == ["from-handler", "from-middleware"]
    assert checked_out(db, app) == 0


def test_extra_middleware_order(app, db, socketio, dbctx):
    log: list[str] = []

    def make(tag):
        def mw(event, call_next):
            log.append(f"{tag}>")
            result = call_next()
            log.append(f"<{tag}")
            return f"{tag}({result})"

        return mw

    class Chat(DBContextNamespace):
        extra_middleware = [make("a"), make("b"), make("c")]

        def on_go(self):
            log.append("handler")
            return "h"

    client = connect(socketio, app, Chat)
    assert call(client, "go") == "a(b(c(h)))"
    assert log == ["a>", "b>", "c>", "handler", "<c", "<b", "<a"]


def test_extra_middleware_can_short_circuit(app, db, socketio, dbctx, Item, url):
    calls = {"handler": 0}

    def gate(event, call_next):
        if event.args and event.args[0] == "blocked":
            return {"blocked": True}
        return call_next()

    class Chat(DBContextNamespace):
        extra_middleware = (gate,)

        def on_add(self, name):
            calls["handler"] += 1
            db.session.add(Item(name=name))
            return {"ok": True}

    client = connect(socketio, app, Chat)
    assert call(client, "add", "blocked") == {"blocked": True}
    assert calls["handler"] == 0
    assert call(client, "add", "allowed") == {"ok": True}
    assert calls["handler"] == 1
    assert stored_names(url) == ["allowed"]
    assert checked_out(db, app) == 0


def test_extra_middleware_raising_is_an_error_ack(app, db, socketio, dbctx, Item, url):
    calls = {"handler": 0}

    def refuse(event, call_next):
        db.session.add(Item(name="from-middleware"))
        raise InvalidRequestError("not allowed")

    class Chat(DBContextNamespace):
        extra_middleware = (refuse,)

        def on_add(self, name):
            calls["handler"] += 1

    client = connect(socketio, app, Chat)
    ack = call(client, "add", "x")
    assert ack == {"error": "invalid_request", "message": "not allowed", "retryable": False}
    assert calls["handler"] == 0
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


# -- setup -------------------------------------------------------------------------------


def test_zero_setup_with_only_flask_sqlalchemy(app, db, socketio, Item, url):
    assert "dbctx" not in app.extensions

    class Chat(DBContextNamespace):
        def on_add(self, name):
            db.session.add(Item(name=name))
            return {"same": self.db_session is db.session()}

        def on_fail(self, name):
            db.session.add(Item(name=name))
            raise RuntimeError(SECRET)

    client = connect(socketio, app, Chat)
    assert call(client, "add", "zero") == {"same": True}
    ack = call(client, "fail", "no")
    assert ack["error"] == "internal_error" and SECRET not in repr(ack)
    assert stored_names(url) == ["zero"]
    assert checked_out(db, app) == 0


def test_no_database_at_all_raises_context_setup_error_naming_both_fixes(tmp_path):
    app = Flask(__name__)
    socketio = SocketIO(app, async_mode="threading")
    calls = {"n": 0}

    class Chat(DBContextNamespace):
        def on_ping(self):
            calls["n"] += 1
            return "pong"

    socketio.on_namespace(Chat(NS))
    client = socketio.test_client(app, namespace=NS)
    with pytest.raises(ContextSetupError) as info:
        call(client, "ping")
    message = str(info.value)
    assert "DBContext(" in message
    assert "Flask-SQLAlchemy" in message or "db.init_app" in message
    assert calls["n"] == 0


# -- plain SQLAlchemy --------------------------------------------------------------------


class PlainBase(DeclarativeBase):
    pass


class PlainItem(PlainBase):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(80), unique=True)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url, pool_size=5, max_overflow=2, pool_timeout=5)
    PlainBase.metadata.create_all(engine)
    yield engine
    engine.dispose()


@ALL_DATABASES
def test_plain_sqlalchemy_sessionmaker(app, socketio, engine, url):
    DBContext(app, socketio, session_factory=sessionmaker(bind=engine))
    sessions: list[Any] = []

    class Chat(DBContextNamespace):
        def on_add(self, name):
            sessions.append(self.db_session)
            self.db_session.add(PlainItem(name=name))
            return "ok"

        def on_fail(self, name):
            self.db_session.add(PlainItem(name=name))
            self.db_session.flush()
            raise RuntimeError(SECRET)

    client = connect(socketio, app, Chat)
    assert call(client, "add", "one") == "ok"
    assert call(client, "add", "two") == "ok"
    ack = call(client, "fail", "three")
    assert ack["error"] == "internal_error"
    assert sessions[0] is not sessions[1]
    assert stored_names(url) == ["one", "two"]
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("previous", [True, False], ids=["registry_in_use", "registry_empty"])
def test_plain_sqlalchemy_scoped_session(app, socketio, engine, url, previous):
    Session = scoped_session(sessionmaker(bind=engine))
    DBContext(app, socketio, session_factory=Session)
    before = Session() if previous else None
    seen: list[dict[str, Any]] = []

    class Chat(DBContextNamespace):
        def on_add(self, name):
            Session.add(PlainItem(name=name))
            seen.append({"same": Session() is self.db_session, "fresh": Session() is not before})
            return "ok"

        def on_fail(self, name):
            Session.add(PlainItem(name=name))
            Session.flush()
            raise RuntimeError(SECRET)

    client = connect(socketio, app, Chat)
    assert call(client, "add", "one") == "ok"
    assert call(client, "fail", "two")["error"] == "internal_error"
    assert seen == [{"same": True, "fresh": True}]
    if previous:
        assert Session.registry.has() and Session() is before
    else:
        assert not Session.registry.has()
    assert stored_names(url) == ["one"]
    assert engine.pool.checkedout() == 0
    Session.remove()


def test_app_context_is_not_reused_inside_the_event(app, db, socketio, dbctx):
    """Inside an outer app context the handler still runs in a context of its own."""
    contexts: list[Any] = []

    class Chat(DBContextNamespace):
        def on_ctx(self):
            contexts.append(app_ctx._get_current_object())

    with app.app_context() as outer:
        client = connect(socketio, app, Chat)
        call(client, "ctx")
        call(client, "ctx")
    assert len(contexts) == 2
    assert contexts[0] is not outer and contexts[1] is not outer
    assert contexts[0] is not contexts[1]
