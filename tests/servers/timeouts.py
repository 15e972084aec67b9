"""Statement-timeout handlers for ``tests.servers.app`` (``--extra tests.servers.timeouts``).

Two namespace classes with the same handlers: ``/tmo`` takes ``DBCTX_STATEMENT_TIMEOUT`` from
the app, ``/tmo_attr`` sets the ``statement_timeout`` class attribute to
:data:`ATTR_TIMEOUT`. Works on PostgreSQL, MariaDB/MySQL and SQLite (a file); every
handler that takes a ``token`` counts its runs under ``"<event>:<token>"`` (retries
included), so a test can tell how often the pipeline ran it.

* ``slow(seconds, token)``: one statement that runs ``seconds`` inside the database:
  ``pg_sleep`` (PostgreSQL), ``SLEEP()`` (MariaDB/MySQL), a bounded recursive CTE sized
  for ``seconds`` at start-up (SQLite); acks True. ``slow_off`` is the same body under
  ``@statement_timeout(None)``.
* ``write(token)``: inserts a ``tmo_rows`` row keyed ``token``, then commits; acks
  ``{"id"}``. ``write_then_slow(token, seconds)``: the insert, then ``slow``.
* ``write_pause_write(token, seconds)``: inserts ``token``, sleeps ``seconds`` in
  Python with the transaction open, then inserts ``token + "-2"``.
* ``write_gate_slow(token, seconds)``: the insert; then the handler waits at a gate
  (listed by ``GET /tmo/marks``) until ``GET /tmo/release?token=...`` (or
  :data:`HOLD_LIMIT` seconds), then runs ``slow``. A test partitions the network
  while its events wait: their statement goes out into a dead connection.
* ``write_hold_commit(token)``: the insert; then, when the event's COMMIT is about to
  be sent (SQLAlchemy's engine ``commit`` event, after everything the library runs
  before it), the handler's connection waits at the same kind of gate. A test
  partitions the network in between: the COMMIT goes out into a dead connection.
* ``show()``: the statement timeout the database applies right now, as
  ``{"seconds", "raw", "backend"}``: ``SHOW statement_timeout`` (PostgreSQL),
  ``@@max_statement_time`` (MariaDB), ``@@max_execution_time`` (MySQL, ms); SQLite has
  none (``seconds`` None). ``backend`` is the server's connection id.
  ``show_decorated`` runs under ``@statement_timeout(DECORATED_TIMEOUT)``,
  ``show_off`` under ``@statement_timeout(None)``; ``/tmo_attr`` adds
  ``show_in_body``, decorated in the class body that sets the attribute
  (``@socketio_dbctx.statement_timeout(BODY_TIMEOUT)``).
* ``/tmo_fn``: ``show``, ``show_decorated`` and ``show_off`` as ``@dbctx.on``
  functions (the decorators stacked under ``@dbctx.on``).

HTTP: ``GET /tmo/metrics`` -> ``{"events": dbctx.metrics(), "calls": {...}}``;
``GET /tmo/outside`` -> ``show()`` read over ``db.engine.connect()`` (a plain pooled
connection, outside any event); ``/tmo/marks`` and ``/tmo/release`` as above.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import sqlalchemy as sa
from flask import Flask, jsonify, request
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

import socketio_dbctx
from socketio_dbctx import DBContext, DBContextNamespace, InvalidRequestError
from tests.servers.common import RunCounter, add_state_route, text, token_rows

NAMESPACE = "/tmo"
ATTR_NAMESPACE = "/tmo_attr"
FUNCTION_NAMESPACE = "/tmo_fn"
#: The ``statement_timeout`` class attribute of ``/tmo_attr``.
ATTR_TIMEOUT = 3
#: The decorator's value on ``show_decorated``.
DECORATED_TIMEOUT = 7
#: The decorator's value on ``/tmo_attr``'s ``show_in_body``.
BODY_TIMEOUT = 5
#: The longest a held COMMIT waits for the test's release.
HOLD_LIMIT = 10.0

#: ``Connection.info`` key naming the token whose COMMIT is to be held.
_HOLD_KEY = "tests_timeouts_hold_commit"

#: Runs per ``"<event>:<token>"``; its lock guards the gate's sets too.
_runs = RunCounter()
_count = _runs.count
_lock = _runs.lock
_marks: set[str] = set()
_released: set[str] = set()


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 20:
        raise InvalidRequestError("seconds must be a number from 0 to 20")
    return float(value)


def _sqlite_rows_per_second() -> float:
    """How many rows of the counting CTE this machine's SQLite makes per second."""
    import sqlite3

    conn = sqlite3.connect(":memory:")
    try:
        rows = 300_000
        started = time.perf_counter()
        conn.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
            "SELECT count(*) FROM c",
            (rows,),
        ).fetchone()
        return rows / max(time.perf_counter() - started, 1e-6)
    finally:
        conn.close()


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    add_row = token_rows(db, "tmo_rows")
    with app.app_context():
        engine = db.engine
    dialect = engine.dialect.name
    rate = _sqlite_rows_per_second() if dialect == "sqlite" else 0.0

    def wait_at_gate(token: str) -> None:
        """Wait (listed in ``_marks``) until the test releases ``token``."""
        with _lock:
            _marks.add(token)
        deadline = time.monotonic() + HOLD_LIMIT
        try:
            while time.monotonic() < deadline:
                with _lock:
                    if token in _released:
                        return
                socketio.sleep(0.01)
        finally:
            with _lock:
                _marks.discard(token)

    def hold_commit(conn: sa.Connection) -> None:
        token = conn.info.pop(_HOLD_KEY, None)
        if token is not None:
            wait_at_gate(token)

    def forget_hold(conn: sa.Connection) -> None:
        conn.info.pop(_HOLD_KEY, None)  # conn.info outlives the checkout

    sa.event.listen(engine, "commit", hold_commit)
    sa.event.listen(engine, "rollback", forget_hold)

    def run_slow(seconds: float) -> None:
        if dialect == "postgresql":
            db.session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
        elif dialect in ("mysql", "mariadb"):
            db.session.execute(sa.text("SELECT SLEEP(:s)"), {"s": seconds})
        elif dialect == "sqlite":
            db.session.execute(
                sa.text(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                    "WHERE x < :n) SELECT count(*) FROM c"
                ),
                {"n": max(1, int(rate * seconds))},
            )
        else:  # pragma: no cover - the tests use the three above
            raise InvalidRequestError(f"no slow statement for {dialect}")

    def read_timeout(conn: sa.Connection) -> dict[str, Any]:
        """The statement timeout in force on ``conn``, in seconds (None: none exists)."""
        if dialect == "postgresql":
            raw = str(conn.exec_driver_sql("SHOW statement_timeout").scalar_one())
            ms = conn.exec_driver_sql(
                "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"
            ).scalar_one()
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            return {"seconds": int(ms) / 1000, "raw": raw, "backend": int(backend)}
        if dialect in ("mysql", "mariadb"):
            if getattr(conn.dialect, "is_mariadb", False):  # known once connected
                value = conn.exec_driver_sql("SELECT @@max_statement_time").scalar_one()
                seconds = float(value)
            else:
                value = conn.exec_driver_sql("SELECT @@max_execution_time").scalar_one()
                seconds = int(value) / 1000
            backend = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
            return {"seconds": seconds, "raw": str(value), "backend": int(backend)}
        return {"seconds": None, "raw": "", "backend": 0}

    class Handlers:
        """The handler bodies of both namespaces."""

        def on_slow(self, seconds: float, token: str) -> bool:
            _count("slow", text(token, "token"))
            run_slow(_seconds(seconds))
            return True

        @socketio_dbctx.statement_timeout(None)
        def on_slow_off(self, seconds: float, token: str) -> bool:
            _count("slow_off", text(token, "token"))
            run_slow(_seconds(seconds))
            return True

        def on_write(self, token: str) -> dict[str, int]:
            _count("write", text(token, "token"))
            return {"id": add_row(token)}

        def on_write_then_slow(self, token: str, seconds: float) -> dict[str, int]:
            _count("write_then_slow", text(token, "token"))
            row_id = add_row(token)
            run_slow(_seconds(seconds))
            return {"id": row_id}

        def on_write_pause_write(self, token: str, seconds: float) -> dict[str, int]:
            _count("write_pause_write", text(token, "token"))
            seconds = _seconds(seconds)
            add_row(token)
            socketio.sleep(seconds)  # the transaction is open, no statement waits
            return {"id": add_row(token + "-2")}

        def on_write_gate_slow(self, token: str, seconds: float) -> dict[str, int]:
            _count("write_gate_slow", text(token, "token"))
            seconds = _seconds(seconds)
            row_id = add_row(token)
            wait_at_gate(token)
            run_slow(seconds)
            return {"id": row_id}

        def on_write_hold_commit(self, token: str) -> dict[str, int]:
            _count("write_hold_commit", text(token, "token"))
            row_id = add_row(token)
            db.session.connection().info[_HOLD_KEY] = token
            return {"id": row_id}

        def on_show(self) -> dict[str, Any]:
            return read_timeout(db.session.connection())

        @socketio_dbctx.statement_timeout(DECORATED_TIMEOUT)
        def on_show_decorated(self) -> dict[str, Any]:
            return read_timeout(db.session.connection())

        @socketio_dbctx.statement_timeout(None)
        def on_show_off(self) -> dict[str, Any]:
            return read_timeout(db.session.connection())

    class Timeouts(Handlers, DBContextNamespace):
        pass

    class AttrTimeouts(Handlers, DBContextNamespace):
        statement_timeout = ATTR_TIMEOUT

        @socketio_dbctx.statement_timeout(BODY_TIMEOUT)
        def on_show_in_body(self) -> dict[str, Any]:
            return read_timeout(db.session.connection())

    socketio.on_namespace(Timeouts(NAMESPACE))
    socketio.on_namespace(AttrTimeouts(ATTR_NAMESPACE))

    @dbctx.on("show", namespace=FUNCTION_NAMESPACE)
    def show_function() -> dict[str, Any]:
        return read_timeout(db.session.connection())

    @dbctx.on("show_decorated", namespace=FUNCTION_NAMESPACE)
    @socketio_dbctx.statement_timeout(DECORATED_TIMEOUT)
    def show_function_decorated() -> dict[str, Any]:
        return read_timeout(db.session.connection())

    @dbctx.on("show_off", namespace=FUNCTION_NAMESPACE)
    @socketio_dbctx.statement_timeout(None)
    def show_function_off() -> dict[str, Any]:
        return read_timeout(db.session.connection())

    add_state_route(app, "/tmo/metrics", dbctx, _runs)

    @app.route("/tmo/outside")
    def outside() -> Any:
        with db.engine.connect() as conn:
            return jsonify(read_timeout(conn))

    @app.route("/tmo/marks")
    def marks() -> Any:
        with _lock:
            return jsonify(sorted(_marks))

    @app.route("/tmo/release")
    def release() -> Any:
        tokens = request.args.getlist("token")
        with _lock:
            _released.update(tokens)
        return jsonify(released=tokens)
