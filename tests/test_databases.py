"""The same guarantees on SQLite, PostgreSQL and MariaDB (DESIGN 7a), driven through
Flask-SocketIO's test client (events run one at a time on this thread): read-only
events, raw SQL, a connection the server kills in the middle of an event, each
database's own statement-timeout error, SQLite's ``database is locked``.

More of the core semantics run on all three databases where they are defined
(``ALL_DATABASES`` in ``test_namespace.py``, ``test_handlers.py``,
``test_extension.py``); real servers and concurrent faults:
``test_database_faults.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ALL_DATABASES, checked_out, stored_names
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace
from socketio_dbctx.acks import error_code
from socketio_dbctx.retry import should_retry
from socketio_dbctx.transient import is_statement_timeout, is_transient

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


# -- statement timeouts: the servers' own errors ----------------------------------------


def cut_a_statement(database: str, conn: sa.Connection) -> None:
    """Run a statement that the database cuts for running too long, each its own way."""
    if database == "postgres":
        conn.exec_driver_sql("SET LOCAL statement_timeout = 100")
        conn.exec_driver_sql("SELECT pg_sleep(5)")
    elif database == "mariadb":
        conn.exec_driver_sql("SET STATEMENT max_statement_time = 0.1 FOR SELECT SLEEP(5)")
    else:  # SQLite has no timeout of its own: a watchdog interrupts a running statement
        raw: Any = conn.connection.dbapi_connection
        running = threading.Event()
        raw.set_progress_handler(lambda: running.set(), 1000)  # returns None: go on
        watchdog = threading.Thread(target=lambda: running.wait(10) and raw.interrupt())
        watchdog.start()
        try:
            conn.exec_driver_sql(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                "SELECT count(*) FROM n"
            )
        finally:
            watchdog.join(10)


@ALL_DATABASES
def test_a_real_statement_timeout_acks_timeout_and_is_never_retried(
    database_url: str, request: pytest.FixtureRequest
) -> None:
    """PostgreSQL ``57014``, MariaDB ``1969``, SQLite ``interrupted``, as the servers
    raise them through SQLAlchemy: classified as a statement timeout."""
    database = request.node.callspec.params["database_url"]
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as info:
            cut_a_statement(database, conn)
    finally:
        engine.dispose()
    error = info.value
    assert is_statement_timeout(error), repr(error)
    assert not is_transient(error)
    assert should_retry(error, phase="handler", idempotent=True) is False
    assert error_code(error) == "timeout"


# -- SQLite: database is locked, in process -----------------------------------------------


@pytest.mark.parametrize(
    "flush_first",
    [True, False],
    ids=["handler_flushes", "commit_flushes"],
)
def test_sqlite_locked_before_commit_is_retried(tmp_path: Any, flush_first: bool) -> None:
    """The test holds SQLite's write lock (a second writer on the file); the handler's
    INSERT meets ``database is locked`` (busy timeout 0). Its second run first lets the
    test's writer commit (same thread: the test client runs events inline), then
    succeeds: one retry, both rows stored once."""
    import sqlite3

    path = tmp_path / "locked.db"
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{path}",
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"timeout": 0}},
    )
    db = SQLAlchemy()
    db.init_app(app)
    socketio = SocketIO(app, async_mode="threading")
    dbctx = DBContext(app, socketio, db, retry_delay=0)

    class Row(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "rows"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(40), nullable=False, unique=True)

    with app.app_context():
        db.create_all()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO rows (name) VALUES ('first-writer')")
    runs: list[int] = []

    class Locked(DBContextNamespace):
        def on_add(self, name: str) -> int:
            runs.append(len(runs) + 1)
            if len(runs) == 2:
                writer.execute("COMMIT")  # the other writer lets go
            db.session.add(Row(name=name))
            if flush_first:
                db.session.flush()
            db.session.commit()  # the handler commits itself
            return len(runs)

    try:
        client = client_for(socketio, app, Locked(NS))
        ack = call(client, "add", "second-writer")
    finally:
        if writer.in_transaction:
            writer.execute("ROLLBACK")
        writer.close()
    with app.app_context():
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        db.engine.dispose()
    with sqlite3.connect(path) as conn:
        names = sorted(name for (name,) in conn.execute("SELECT name FROM rows"))
    assert ack == 2, ack
    assert names == ["first-writer", "second-writer"]
    assert dbctx.metrics()[f"{NS}:add"]["retries"] == 1
