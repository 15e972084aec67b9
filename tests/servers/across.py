"""Handlers for the cross-feature server tests (``--extra tests.servers.across``),
PostgreSQL only; see ``tests/test_features_across_servers.py``.

Namespace ``/x``, every handler an ``@dbctx.on`` function (the function-handler path;
the namespace-class path is the other modules'). Each counts its runs under
``"<event>:<token>"`` in this process, so a test can add up the runs of all workers.

* ``hold(seconds)``: ``SELECT 1``, then keeps its connection ``seconds`` (to fill the
  pool with open connections); acks ``pg_backend_pid()``.
* ``query(token)``: ``SELECT 1`` (hangs while the database does not answer), then
  inserts an ``x_rows`` row ``token``; acks ``{"run"}``.
* ``place(data)``: keyed by ``data["id"]`` (``@idempotency_key``); inserts an
  ``x_rows`` row ``data["token"]``, broadcasts ``placed`` ``[token, worker port]`` to
  everybody on ``/x`` (a held emit), and, when ``data["gate"]`` is an int, waits for
  the PostgreSQL advisory lock of that number (the test holds it) before it returns;
  acks ``{"row", "token", "port"}``.

The key table comes from ``socketio_dbctx.idempotency_table(db.metadata)`` (created
with the app's tables at start, as an Alembic user would have it).

HTTP: ``GET /x/calls`` -> ``{"calls": {...}, "events": dbctx.metrics()}``.
"""

from __future__ import annotations

import argparse
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask_socketio import SocketIO, emit
from flask_sqlalchemy import SQLAlchemy

import socketio_dbctx
from socketio_dbctx import DBContext, InvalidRequestError
from tests.servers.common import RunCounter, add_state_route, text, token_rows

NAMESPACE = "/x"

#: Runs per ``"<event>:<token>"``.
_runs = RunCounter()
_count = _runs.count


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    add_row = token_rows(db, "x_rows")
    if hasattr(socketio_dbctx, "idempotency_table"):  # until the key store exists
        socketio_dbctx.idempotency_table(db.metadata)

    @dbctx.on("hold", namespace=NAMESPACE)
    def hold(seconds: float) -> int:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise InvalidRequestError("seconds must be a number")
        pid = int(db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        socketio.sleep(min(max(float(seconds), 0.0), 5.0))
        return pid

    @dbctx.on("query", namespace=NAMESPACE)
    def query(token: str) -> dict[str, int]:
        run = _count("query", text(token, "token"))
        db.session.execute(sa.text("SELECT 1"))
        add_row(token)
        return {"run": run}

    @dbctx.on("place", namespace=NAMESPACE)
    @socketio_dbctx.idempotency_key(lambda data: data.get("id"))
    def place(data: dict[str, Any]) -> dict[str, Any]:
        token = text(data.get("token"), "token")
        _count("place", token)
        row = add_row(token)
        emit("placed", [token, args.port], broadcast=True, namespace=NAMESPACE)
        gate = data.get("gate")
        if isinstance(gate, int) and not isinstance(gate, bool):
            db.session.execute(sa.text("SELECT pg_advisory_xact_lock(:gate)"), {"gate": gate})
        return {"row": row, "token": token, "port": args.port}

    add_state_route(app, "/x/calls", dbctx, _runs)
