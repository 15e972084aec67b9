"""Real MariaDB/MySQL and SQLite failures for ``tests.servers.app``
(``--extra tests.servers.db_faults``).

Namespace ``/d`` (a ``DBContextNamespace``). Every handler counts its runs under
``"<event>:<token>"`` (retries included) and stores one ``d_rows`` row keyed ``token``,
so a test can tell how often the pipeline ran it and that it was applied once. The
test coordinates with the handlers through the database itself, never by sleeping:
MariaDB named locks (``GET_LOCK``: a handler waits for a lock the test holds, and
shows up in ``information_schema.PROCESSLIST`` while it waits) and row locks.

* ``gated_write(token, gate)`` (MariaDB): inserts its row, then waits for the named
  lock ``gate`` (and lets it go at once); acks ``{"id", "run", "connection_id"}``.
  A test that holds ``gate`` can ``KILL`` the waiting connection.
* ``kill_self(token, times)`` (MariaDB): the first ``times`` runs insert their row and
  then ``KILL CONNECTION_ID()``: the server kills the connection (``1927``).
* ``cross_update(token, first, second, gate)`` (MariaDB): ``d_counters.value + 1`` on
  row ``first``, waits for ``gate``, then on row ``second``. Two of them in opposite
  orders, released together, deadlock (``1213``).
* ``locked_update(token, name)`` (MariaDB): ``d_counters.value + 1`` on row ``name``
  with ``innodb_lock_wait_timeout`` 1 s on the first run, 30 s on later ones: a row
  lock the test holds makes the first run fail with ``1205``.
* ``db_sleep(seconds)`` (MariaDB): ``SELECT SLEEP(seconds)``, a wait inside the
  database driver (green only when the driver is); acks True.
* ``sqlite_write(token)`` (SQLite): inserts its row; from the second run on, it first
  sets ``PRAGMA busy_timeout`` to 30 s (the engine's is 0.05 s), so that once the
  test saw the retry start it may let its own write lock go.

HTTP: ``GET /d/metrics`` -> ``{"events": dbctx.metrics(), "calls": {...}}``.
"""

from __future__ import annotations

import argparse

import sqlalchemy as sa
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace, InvalidRequestError
from tests.servers.common import RunCounter, add_state_route, text, token_rows

NAMESPACE = "/d"

#: Seconds a handler waits for a gate the test holds before giving up.
GATE_TIMEOUT = 30

#: Runs per ``"<event>:<token>"``.
_runs = RunCounter()
_count = _runs.count


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    add_row = token_rows(db, "d_rows")
    counters = sa.Table(
        "d_counters",
        db.metadata,
        sa.Column("name", sa.String(60), primary_key=True),
        sa.Column("value", sa.Integer, nullable=False),
    )

    def wait_for_gate(gate: str) -> None:
        got = db.session.execute(
            sa.text("SELECT GET_LOCK(:gate, :timeout)"), {"gate": gate, "timeout": GATE_TIMEOUT}
        ).scalar()
        if got != 1:
            raise RuntimeError(f"gate {gate!r} not opened within {GATE_TIMEOUT}s")
        db.session.execute(sa.text("SELECT RELEASE_LOCK(:gate)"), {"gate": gate})

    def increment(name: str) -> None:
        updated = db.session.execute(
            counters.update().where(counters.c.name == name).values(value=counters.c.value + 1)
        )
        if updated.rowcount != 1:
            raise InvalidRequestError(f"no counter named {name!r}")

    class DatabaseFaults(DBContextNamespace):
        def on_gated_write(self, token: str, gate: str) -> dict[str, int]:
            run = _count("gated_write", text(token, "token"))
            row_id = add_row(token)
            connection_id = int(db.session.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())
            wait_for_gate(text(gate, "gate"))
            return {"id": row_id, "run": run, "connection_id": connection_id}

        def on_kill_self(self, token: str, times: int = 1) -> dict[str, int]:
            run = _count("kill_self", text(token, "token"))
            if isinstance(times, bool) or not isinstance(times, int) or not 0 <= times <= 5:
                raise InvalidRequestError("times must be an integer from 0 to 5")
            row_id = add_row(token)
            if run <= times:
                db.session.execute(sa.text("KILL CONNECTION_ID()"))  # 1927 for this statement
            return {"id": row_id, "run": run}

        def on_cross_update(self, token: str, first: str, second: str, gate: str) -> int:
            run = _count("cross_update", text(token, "token"))
            increment(text(first, "first"))
            wait_for_gate(text(gate, "gate"))
            increment(text(second, "second"))
            add_row(token)
            return run

        def on_locked_update(self, token: str, name: str) -> int:
            run = _count("locked_update", text(token, "token"))
            wait = 1 if run == 1 else GATE_TIMEOUT
            db.session.execute(sa.text(f"SET SESSION innodb_lock_wait_timeout = {wait}"))
            increment(text(name, "name"))
            add_row(token)
            return run

        def on_db_sleep(self, seconds: float) -> bool:
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise InvalidRequestError("seconds must be a number")
            if not 0 <= seconds <= 5:
                raise InvalidRequestError("seconds must be from 0 to 5")
            db.session.execute(sa.text("SELECT SLEEP(:seconds)"), {"seconds": seconds})
            return True

        def on_sqlite_write(self, token: str) -> dict[str, int]:
            run = _count("sqlite_write", text(token, "token"))
            if run > 1:
                db.session.execute(sa.text(f"PRAGMA busy_timeout = {GATE_TIMEOUT * 1000}"))
            return {"id": add_row(token), "run": run}

    socketio.on_namespace(DatabaseFaults(NAMESPACE))
    add_state_route(app, "/d/metrics", dbctx, _runs)
