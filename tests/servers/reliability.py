"""Uncertain commits and idempotency keys for ``tests.servers.app``
(``--extra tests.servers.reliability``), on PostgreSQL, MariaDB and SQLite.

Every handler takes one dict ``data`` with a ``token`` (1-100 characters), counts
its runs under ``"<namespace>:<event>:<token>"`` (retries included), inserts one
``r_rows`` row ``(token, event)`` and broadcasts ``written`` ``{"token", "event",
"run"}`` to the whole namespace (a held emit: a listener client counts them). The
ack is ``{"token", "event", "run"}``; ``run`` is the run count of the run that
answered, so a stored ack handed out again still says ``run: 1``.

Options in ``data``:

* ``gate``: once its row is inserted, the run marks ``gate`` entered and waits
  (``socketio.sleep``, any async mode) until the test opens it over HTTP
  (``GET /r/gate/<gate>``); at most :data:`GATE_TIMEOUT` seconds, then it raises.
  The row (and an idempotency claim) stays uncommitted meanwhile.
* ``fail``: the run raises ``RuntimeError`` after inserting its row (a failed run).
* ``kill_commit`` (PostgreSQL): the first run's backend is terminated from a second
  connection just before its COMMIT is sent (an engine ``commit`` listener), and the
  listener waits until the backend has exited: the transaction is aborted, and the
  COMMIT meets a dead connection.

Namespace ``/r`` (a ``DBContextNamespace``):

* ``write``: plain (not idempotent, no key).
* ``idem_write``: ``@idempotent``; inserts its row only when ``token`` has none for
  this event yet; the ack adds ``existed`` (whether one was there before this run).
* ``keyed_write`` and ``keyed_other``: ``@idempotency_key(lambda data:
  data.get("key"))``, the same body.

Namespace ``/rk``: the class attribute ``idempotency_key`` (a function of the
payload, ``data.get("key")``) keys its ``keyed_write`` and ``write``.

HTTP: ``GET /r/metrics`` -> ``{"events": dbctx.metrics(), "calls": {...}, "entered":
[...]}``; ``GET /r/gate/<name>`` opens a gate. At setup the module calls
``dbctx.create_tables()`` (the idempotency table).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import sqlalchemy as sa
from flask import Flask, jsonify
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

import socketio_dbctx
from socketio_dbctx import DBContext, DBContextNamespace, InvalidRequestError, idempotent
from tests.servers.common import RunCounter, add_state_route, text

NAMESPACE = "/r"
KEYED_NAMESPACE = "/rk"

#: Seconds a gated run waits for the test to open its gate before it gives up.
GATE_TIMEOUT = 30.0

#: Runs per ``"<namespace>:<event>:<token>"``; its lock guards the rest here too.
_runs = RunCounter()
_count = _runs.count
_lock = _runs.lock
_gates_open: set[str] = set()
_entered: set[str] = set()
#: id(DBAPI connection) -> backend pid, for the ``kill_commit`` commit listener.
_kill_at_commit: dict[int, int] = {}


def _text(value: Any, what: str) -> str:
    return text(value, what, longest=100)


def request_key(data: Any) -> Any:
    """The idempotency key of a request: ``data["key"]`` (None when absent)."""
    return data.get("key") if isinstance(data, dict) else None


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    rows = sa.Table(
        "r_rows",
        db.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token", sa.String(100), nullable=False, index=True),
        sa.Column("event", sa.String(40), nullable=False),
    )
    with app.app_context():
        engine = db.engine
        # a second way in, outside the pool, for the kill_commit listener
        # (autocommit: pg_stat_activity is a snapshot that lasts a transaction)
        killer = sa.create_engine(
            engine.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
        )

    def before_commit(conn: sa.Connection) -> None:
        dbapi = conn.connection.dbapi_connection
        with _lock:
            pid = _kill_at_commit.pop(id(dbapi), None)
        if pid is None:
            return
        with killer.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            deadline = time.monotonic() + 10
            while other.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar_one():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"backend {pid} did not exit")
                socketio.sleep(0.01)

    sa.event.listen(engine, "commit", before_commit)

    def wait_at_gate(gate: str) -> None:
        with _lock:
            _entered.add(gate)
        deadline = time.monotonic() + GATE_TIMEOUT
        while True:
            with _lock:
                if gate in _gates_open:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gate {gate!r} not opened within {GATE_TIMEOUT}s")
            socketio.sleep(0.01)

    def work(namespace: str, event: str, data: Any, *, only_once: bool = False) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise InvalidRequestError("data must be an object")
        token = _text(data.get("token"), "token")
        run = _count(namespace, event, token)
        ack: dict[str, Any] = {"token": token, "event": event, "run": run}
        existed = False
        if only_once:
            existed = (
                db.session.execute(
                    sa.select(rows.c.id).where(rows.c.token == token, rows.c.event == event)
                ).first()
                is not None
            )
            ack["existed"] = existed
        if not existed:
            db.session.execute(rows.insert().values(token=token, event=event))
        if data.get("kill_commit") and run == 1:
            dbapi = db.session.connection().connection.dbapi_connection
            with _lock:
                _kill_at_commit[id(dbapi)] = int(dbapi.info.backend_pid)  # type: ignore[union-attr]
        socketio.emit("written", {"token": token, "event": event, "run": run}, namespace=namespace)
        if data.get("gate"):
            wait_at_gate(_text(data["gate"], "gate"))
        if data.get("fail"):
            raise RuntimeError("the reliability server fails this run on purpose")
        return ack

    class Reliability(DBContextNamespace):
        def on_write(self, data: Any) -> dict[str, Any]:
            return work(NAMESPACE, "write", data)

        @idempotent
        def on_idem_write(self, data: Any) -> dict[str, Any]:
            return work(NAMESPACE, "idem_write", data, only_once=True)

        @socketio_dbctx.idempotency_key(request_key)
        def on_keyed_write(self, data: Any) -> dict[str, Any]:
            return work(NAMESPACE, "keyed_write", data)

        @socketio_dbctx.idempotency_key(lambda data: data.get("key"))
        def on_keyed_other(self, data: Any) -> dict[str, Any]:
            return work(NAMESPACE, "keyed_other", data)

    class KeyedByClass(DBContextNamespace):
        idempotency_key = request_key

        def on_keyed_write(self, data: Any) -> dict[str, Any]:
            return work(KEYED_NAMESPACE, "keyed_write", data)

        def on_write(self, data: Any) -> dict[str, Any]:  # keyed too: runs when no key
            return work(KEYED_NAMESPACE, "write", data)

    socketio.on_namespace(Reliability(NAMESPACE))
    socketio.on_namespace(KeyedByClass(KEYED_NAMESPACE))

    add_state_route(app, "/r/metrics", dbctx, _runs, lambda: {"entered": sorted(_entered)})

    @app.route("/r/gate/<name>")
    def open_gate(name: str) -> Any:
        with _lock:
            _gates_open.add(name)
        return jsonify(opened=name)

    with app.app_context():
        dbctx.create_tables()
        dbctx.create_tables()  # a second call finds the table and changes nothing
