"""Fault-injection handlers for ``tests.servers.app`` (``--extra tests.servers.faults``).

Namespace ``/f`` (a ``DBContextNamespace``); every handler that takes a ``token``
counts its runs under ``"<event>:<token>"``, so a test can tell how many times the
pipeline ran it (retries included):

* ``hold(seconds)``: ``SELECT pg_backend_pid()``, then keep the connection
  ``seconds`` (to warm the pool); acks the pid.
* ``write(token)``: inserts a ``fault_rows`` row keyed ``token``; acks ``{"id"}``.
* ``increment(name, pause)``: read-modify-write of ``fault_counters.value`` at
  SERIALIZABLE, sleeping ``pause`` between the read and the write; acks the new value.
* ``insert_unique(key)``: inserts a ``fault_rows`` row (a second call with the same key
  is a unique violation); ``sql_error(token)`` runs ``SELECT 1/0`` (SQLSTATE 22012)
  after an insert; ``buggy(token)`` inserts, then raises a ``RuntimeError`` whose text
  is :data:`SECRET`; ``invalid(token)`` raises ``InvalidRequestError``.
* ``kill_self(token, times)``: the first ``times`` runs terminate their own backend
  (``pg_terminate_backend(pg_backend_pid())``) before anything is stored; later runs
  insert a row keyed ``token``. ``kill_self_no_retry`` is the same body, ``@no_retry``.
* ``add_one(name, token)``: ``UPDATE ... SET value = value + 1`` (not idempotent).
  ``put(key, value, token)``: ``@idempotent`` upsert into ``fault_kv``; acks
  ``{"existed": bool}`` (whether the key was there before this run).

HTTP: ``GET /f/metrics`` -> ``{"events": dbctx.metrics(), "calls": {...}}``.
"""

from __future__ import annotations

import argparse
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import (
    DBContext,
    DBContextNamespace,
    InvalidRequestError,
    idempotent,
    no_retry,
)
from tests.servers.common import RunCounter, add_state_route, text

NAMESPACE = "/f"

#: The text of the exception ``buggy`` raises; it must never reach a client.
SECRET = "fault-secret-detail: SELECT card_number FROM wallets"

#: Runs per ``"<event>:<token>"``.
_runs = RunCounter()
_count = _runs.count


def _text(value: Any, what: str) -> str:
    return text(value, what, longest=100)


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
        raise InvalidRequestError(f"{what} must be a number of seconds from 0 to 10")
    return float(value)


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    class FaultRow(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "fault_rows"
        id = sa.Column(sa.Integer, primary_key=True)
        key = sa.Column(sa.String(100), nullable=False, unique=True)

    counters = sa.Table(
        "fault_counters",
        db.metadata,
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.Integer, nullable=False),
    )
    kv = sa.Table(
        "fault_kv",
        db.metadata,
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.String(100), nullable=False),
    )

    def add_row(key: str) -> int:
        row = FaultRow(key=key)
        db.session.add(row)
        db.session.flush()
        return int(row.id)

    def kill_self(event: str, token: str, times: int) -> dict[str, Any]:
        run = _count(event, _text(token, "token"))
        if isinstance(times, bool) or not isinstance(times, int) or not 0 <= times <= 10:
            raise InvalidRequestError("times must be an integer from 0 to 10")
        if run <= times:
            # The backend really dies: the client sees 57P01 / a closed connection.
            db.session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return {"id": add_row(token), "run": run}

    class Faults(DBContextNamespace):
        def on_hold(self, seconds: float = 0.0) -> int:
            pid = int(db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
            socketio.sleep(_seconds(seconds, "seconds"))
            return pid

        def on_write(self, token: str) -> dict[str, int]:
            _count("write", _text(token, "token"))
            return {"id": add_row(token)}

        def on_increment(self, name: str, pause: float = 0.0) -> int:
            _text(name, "name")
            pause = _seconds(pause, "pause")
            self.db_session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
            value = db.session.execute(
                sa.select(counters.c.value).where(counters.c.name == name)
            ).scalar_one()
            if pause:
                socketio.sleep(pause)  # widen the window between the read and the write
            db.session.execute(
                counters.update().where(counters.c.name == name).values(value=value + 1)
            )
            return int(value) + 1

        def on_insert_unique(self, key: str) -> dict[str, int]:
            _count("insert_unique", _text(key, "key"))
            db.session.add(FaultRow(key=key))  # flushed by the commit: 23505 there
            return {"ok": 1}

        def on_sql_error(self, token: str) -> int:
            _count("sql_error", _text(token, "token"))
            add_row(token)
            return int(db.session.execute(sa.text("SELECT 1 / 0")).scalar_one())

        def on_buggy(self, token: str) -> None:
            _count("buggy", _text(token, "token"))
            add_row(token)
            raise RuntimeError(SECRET)

        def on_invalid(self, token: str) -> None:
            _count("invalid", _text(token, "token"))
            add_row(token)
            raise InvalidRequestError("the fault server says this request is invalid")

        def on_kill_self(self, token: str, times: int = 1) -> dict[str, Any]:
            return kill_self("kill_self", token, times)

        @no_retry
        def on_kill_self_no_retry(self, token: str, times: int = 1) -> dict[str, Any]:
            return kill_self("kill_self_no_retry", token, times)

        def on_add_one(self, name: str, token: str) -> int:
            _count("add_one", _text(token, "token"))
            value = db.session.execute(
                counters.update()
                .where(counters.c.name == _text(name, "name"))
                .values(value=counters.c.value + 1)
                .returning(counters.c.value)
            ).scalar_one()
            return int(value)

        @idempotent
        def on_put(self, key: str, value: str, token: str) -> dict[str, bool]:
            _count("put", _text(token, "token"))
            key, value = _text(key, "key"), _text(value, "value")
            existed = (
                db.session.execute(sa.select(kv.c.value).where(kv.c.key == key)).first()
                is not None
            )
            db.session.execute(
                sa.text(
                    "INSERT INTO fault_kv (key, value) VALUES (:key, :value) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                ),
                {"key": key, "value": value},
            )
            return {"existed": existed}

    socketio.on_namespace(Faults(NAMESPACE))
    add_state_route(app, "/f/metrics", dbctx, _runs)
