"""The same guarantees on SQLite, PostgreSQL and MariaDB (DESIGN 7a), driven through
Flask-SocketIO's test client (events run one at a time on this thread): read-only
events, raw SQL, a connection the server kills in the middle of an event.

More of the core semantics run on all three databases where they are defined
(``ALL_DATABASES`` in ``test_namespace.py``, ``test_handlers.py``,
``test_extension.py``); real servers and concurrent faults:
``test_database_faults.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ALL_DATABASES, checked_out, stored_names
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace

NS = "/t"


@pytest.fixture
def dbctx(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> DBContext:
    return DBContext(app, socketio, db, retry_delay=0)


def client_for(socketio: SocketIO, app: Flask, namespace: DBContextNamespace) -> Any:
    socketio.on_namespace(namespace)
    return socketio.test_client(app, namespace=NS)


def call(client: Any, event: str, *args: Any) -> Any:
    return client.emit(event, *args, namespace=NS, callback=True)


@ALL_DATABASES
def test_read_only_events_answer_and_leave_nothing_behind(
    app: Flask, db: SQLAlchemy, socketio: SocketIO, dbctx: DBContext, Item: Any, url: str
) -> None:
    class Reader(DBContextNamespace):
        def on_count(self) -> int:
            return int(db.session.execute(sa.select(sa.func.count()).select_from(Item)).scalar())

        def on_names(self) -> list[str]:
            return list(db.session.execute(sa.select(Item.name).order_by(Item.name)).scalars())

        def on_missing_table(self) -> int:
            return int(db.session.execute(sa.text("SELECT count(*) FROM nope")).scalar())

    client = client_for(socketio, app, Reader(NS))
    with app.app_context():
        db.session.add_all([Item(name="b"), Item(name="a")])
        db.session.commit()
    assert call(client, "count") == 2
    assert call(client, "names") == ["a", "b"]
    assert call(client, "missing_table")["error"] == "internal_error"
    assert call(client, "count") == 2  # the failed read left the pool healthy
    assert checked_out(db, app) == 0
    assert stored_names(url) == ["a", "b"]
    metrics = dbctx.metrics()
    assert metrics[f"{NS}:count"]["errors"] == 0
    assert metrics[f"{NS}:missing_table"]["errors"] == 1


@ALL_DATABASES
def test_raw_sql_is_committed_and_rolled_back_on_error(
    app: Flask, db: SQLAlchemy, socketio: SocketIO, dbctx: DBContext, Item: Any, url: str
) -> None:
    """Plain ``INSERT`` statements (no ORM object, no flush) are committed like ORM
    writes, and undone like them when the handler fails."""
    seen_inside: list[list[str]] = []

    class Raw(DBContextNamespace):
        def on_insert(self, name: str) -> str:
            db.session.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": name})
            seen_inside.append(stored_names(url))  # another connection: not yet visible
            return name

        def on_insert_then_fail(self, name: str) -> None:
            db.session.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": name})
            raise RuntimeError("after the INSERT")

    client = client_for(socketio, app, Raw(NS))
    assert call(client, "insert", "kept") == "kept"
    assert seen_inside == [[]]
    assert stored_names(url) == ["kept"]
    assert call(client, "insert_then_fail", "undone")["error"] == "internal_error"
    assert stored_names(url) == ["kept"]
    assert checked_out(db, app) == 0


#: SQL that makes the server end the connection running it.
KILL_OWN_CONNECTION = {
    "postgres": "SELECT pg_terminate_backend(pg_backend_pid())",
    "mariadb": "KILL CONNECTION_ID()",
}


@pytest.mark.parametrize("database_url", sorted(KILL_OWN_CONNECTION), indirect=True)
def test_a_connection_the_server_ends_mid_event_is_retried(
    app: Flask,
    db: SQLAlchemy,
    socketio: SocketIO,
    dbctx: DBContext,
    Item: Any,
    url: str,
    request: pytest.FixtureRequest,
) -> None:
    """The first run inserts, then its connection is killed by the server (PostgreSQL
    ``57P01``, MariaDB ``1927``): the event runs again on a fresh connection and its
    row is stored once."""
    kill = KILL_OWN_CONNECTION[request.node.callspec.params["database_url"]]
    runs: list[int] = []

    class Killer(DBContextNamespace):
        def on_add(self, name: str) -> int:
            runs.append(len(runs) + 1)
            db.session.add(Item(name=name))
            db.session.flush()
            if len(runs) == 1:
                db.session.execute(sa.text(kill))
            return len(runs)

    client = client_for(socketio, app, Killer(NS))
    assert call(client, "add", "once") == 2
    assert stored_names(url) == ["once"]
    assert dbctx.metrics()[f"{NS}:add"]["retries"] == 1
    assert checked_out(db, app) == 0
    assert call(client, "add", "next") == 3  # the pool serves the next event
    assert stored_names(url) == ["next", "once"]
