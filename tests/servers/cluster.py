"""Extra handlers for the several-workers tests: ``--extra tests.servers.cluster``.

A ``DBContextNamespace`` (default ``/trade``; ``--set CLUSTER_TRADE_NAMESPACE="/x"``
gives each test its own, so concurrent runs on one Redis never see each other's
broadcasts) whose ``trade`` event stores a row, commits it and then broadcasts
``trade`` to every client of the namespace on every worker (``self.emit`` with no
``to``: through the message queue). ``count`` counts the stored rows.

HTTP: ``/_cluster`` answers ``{"worker": "host:pid", "cluster": bool}`` (whether
the cluster view is enabled in this process).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import sqlalchemy as sa
from flask import Flask, jsonify
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace, InvalidRequestError
from socketio_dbctx.state import app_state, worker_id

SYMBOL = re.compile(r"[A-Z0-9.]{1,12}")
MAX_QTY = 1_000_000


def parse_trade(data: Any) -> tuple[str, int]:
    """``(symbol, qty)`` from ``{"symbol": str, "qty": int}``.

    :raises InvalidRequestError: for anything else (missing or extra keys, wrong types).
    """
    if not isinstance(data, dict) or set(data) != {"symbol", "qty"}:
        raise InvalidRequestError("trade takes {'symbol': str, 'qty': int}")
    symbol, qty = data["symbol"], data["qty"]
    if not isinstance(symbol, str) or not SYMBOL.fullmatch(symbol):
        raise InvalidRequestError("symbol must be 1-12 of A-Z, 0-9 and '.'")
    if isinstance(qty, bool) or not isinstance(qty, int) or not 0 < qty <= MAX_QTY:
        raise InvalidRequestError(f"qty must be an integer 1-{MAX_QTY}")
    return symbol, qty


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    namespace = str(app.config.get("CLUSTER_TRADE_NAMESPACE", "/trade"))

    class Trade(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "cluster_trades"
        id = sa.Column(sa.Integer, primary_key=True)
        symbol = sa.Column(sa.String(12), nullable=False)
        qty = sa.Column(sa.Integer, nullable=False)
        worker = sa.Column(sa.String(200), nullable=False)

    class TradeNamespace(DBContextNamespace):
        def on_trade(self, data: Any) -> dict[str, Any]:
            symbol, qty = parse_trade(data)
            trade = Trade(symbol=symbol, qty=qty, worker=worker_id())
            self.db_session.add(trade)
            self.db_session.commit()  # stored before anybody hears of it
            payload = {"id": trade.id, "symbol": symbol, "qty": qty, "worker": trade.worker}
            self.emit("trade", payload)  # every client of the namespace, on every worker
            return {"ok": True, "trade": payload}

        def on_count(self) -> int:
            query = sa.select(sa.func.count()).select_from(Trade)
            return int(self.db_session.execute(query).scalar_one())

    socketio.on_namespace(TradeNamespace(namespace))

    @app.route("/_cluster")
    def cluster() -> Any:
        return jsonify(worker=worker_id(), cluster=app_state(app).cluster is not None)
