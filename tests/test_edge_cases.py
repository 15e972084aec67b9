"""Edge cases found in review: retries after a handler's own COMMIT, refusals that must
survive a global Socket.IO error handler, and admission ``busy`` answers in the metrics."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import checked_out
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import exc as sa_exc

from socketio_dbctx import DBContext, DBContextNamespace, idempotent


def _lost_connection() -> sa_exc.OperationalError:
    return sa_exc.OperationalError(
        "SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True
    )


@pytest.fixture
def rows(app: Flask, db: SQLAlchemy) -> type[Any]:
    class Row(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "edge_rows"
        id = sa.Column(sa.Integer, primary_key=True)
        text = sa.Column(sa.String(50), nullable=False)

    with app.app_context():
        db.create_all()
    return Row


def _count(app: Flask, db: SQLAlchemy, model: type[Any]) -> int:
    with app.app_context():
        return int(db.session.scalar(sa.select(sa.func.count()).select_from(model)))


@pytest.mark.parametrize("mark_idempotent", [False, True], ids=["plain", "idempotent"])
def test_no_retry_after_the_handler_committed_itself(
    app: Flask, db: SQLAlchemy, socketio: SocketIO, rows: type[Any], mark_idempotent: bool
) -> None:
    """A handler that commits, then loses its connection, must not run again (the row
    would be written twice) unless it is marked @idempotent."""
    calls: list[int] = []

    def body(self: Any) -> str:
        calls.append(1)
        db.session.add(rows(text="once"))
        db.session.commit()  # the handler commits on its own (e.g. to get an id)
        if len(calls) == 1:
            raise _lost_connection()
        return "done"

    handler = idempotent(body) if mark_idempotent else body

    class NS(DBContextNamespace):
        retry_delay = 0.0
        on_write = handler

    socketio.on_namespace(NS("/edge"))
    DBContext(app, socketio, db)
    client = socketio.test_client(app, namespace="/edge")
    ack = client.emit("write", namespace="/edge", callback=True)
    if mark_idempotent:
        assert ack == "done" and len(calls) == 2
        assert _count(app, db, rows) == 2  # idempotent means the user accepted this
    else:
        assert ack["error"] == "db_unavailable" and ack["retryable"] is False, ack
        assert len(calls) == 1
        assert _count(app, db, rows) == 1
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("kind", ["builtin", "socketio"])
def test_refusal_survives_a_global_error_handler(
    app: Flask, db: SQLAlchemy, socketio: SocketIO, kind: str
) -> None:
    """Flask-SocketIO hands exceptions to on_error_default, whose None return would
    accept the client; a refusal must still refuse."""
    from socketio.exceptions import ConnectionRefusedError as SocketIORefused

    seen: list[BaseException] = []

    @socketio.on_error_default
    def on_error(exc: BaseException) -> None:
        seen.append(exc)

    class NS(DBContextNamespace):
        def on_connect(self, auth: Any = None) -> None:
            if kind == "builtin":
                raise ConnectionRefusedError("login first")
            raise SocketIORefused("login first")

    socketio.on_namespace(NS("/gate"))
    DBContext(app, socketio, db)
    client = socketio.test_client(app, namespace="/gate")
    assert not client.is_connected("/gate")
    assert seen == []
    assert checked_out(db, app) == 0


def test_setup_error_on_connect_refuses_even_with_a_global_error_handler() -> None:
    """No database at all: the connect is refused (and logged), not accepted by the
    global error handler."""
    bare = Flask("bare")
    sio = SocketIO(bare, async_mode="threading")

    @sio.on_error_default
    def on_error(exc: BaseException) -> None:
        return None

    class NS(DBContextNamespace):
        def on_connect(self, auth: Any = None) -> None:
            return None

    sio.on_namespace(NS("/nodb"))
    client = sio.test_client(bare, namespace="/nodb")
    assert not client.is_connected("/nodb")


def test_admission_busy_is_counted_in_metrics(
    app: Flask, db: SQLAlchemy, socketio: SocketIO
) -> None:
    """An event turned away by admission shows up as ``busy`` in dbctx.metrics()."""
    entered, release = threading.Event(), threading.Event()

    class NS(DBContextNamespace):
        max_in_flight_per_client = 1
        queue_timeout = 0.2

        def on_block(self) -> str:
            entered.set()
            release.wait(10)
            return "released"

    socketio.on_namespace(NS("/adm"))
    dbctx = DBContext(app, socketio, db)
    client = socketio.test_client(app, namespace="/adm")
    first: list[Any] = []
    # the test client runs events on the calling thread: drive the second one from another
    holder = threading.Thread(
        target=lambda: first.append(client.emit("block", namespace="/adm", callback=True))
    )
    holder.start()
    assert entered.wait(10)
    second = client.emit("block", namespace="/adm", callback=True)
    release.set()
    holder.join(10)
    assert second["error"] == "busy" and second["retryable"] is True
    assert first == ["released"]
    with app.app_context():
        stats = dbctx.metrics()["/adm:block"]
    assert stats["count"] == 2 and stats["busy"] == 1 and stats["in_flight"] == 0
