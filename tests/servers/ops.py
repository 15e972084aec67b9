"""Extra handlers for the operations tests: ``--extra tests.servers.ops``.

Namespace ``/ops`` (a ``DBContextNamespace``):

- ``slow(key)``: stores a row ``key``, then holds the event (and its connection) until
  ``GET /_ops/release`` lets every held event go; acks ``{"ok": True, "key": key}``.
- ``quick(key)``: stores a row ``key``; acks the same.
- ``fail(key)``: raises ``RuntimeError`` (acked ``internal_error``).

HTTP routes:

- ``/_ops/state``: ``held`` (slow events holding now), ``draining``, ``status``
  (``dbctx.status()``), ``drained`` (what the last ``/_ops/drain`` returned, or null).
- ``/_ops/metrics``: ``dbctx.metrics()``.
- ``/_ops/release``: lets every held event go.
- ``/_ops/drain?timeout=S``: starts ``dbctx.drain(S)`` in a background task.
- ``/healthz``: ``dbctx.health_check()``, 503 when not healthy (as the sample app's).
- ``/metrics``: the Prometheus text of ``socketio_dbctx.prometheus``.

App config (``--set``): ``OPS_SIGNALS=true`` calls ``dbctx.drain_on_signals()``.
"""

from __future__ import annotations

import argparse
from typing import Any

from flask import Flask, jsonify, request
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from prometheus_client import CollectorRegistry

from socketio_dbctx import DBContext, DBContextNamespace
from socketio_dbctx.prometheus import metrics_response, register


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    class OpsRow(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "ops_rows"
        key = db.Column(db.String(64), primary_key=True)

    gate = {"event": socketio.server.eio.create_event(), "held": 0}
    result: dict[str, Any] = {"drained": None}

    class Ops(DBContextNamespace):
        def on_slow(self, key: str) -> dict[str, Any]:
            db.session.add(OpsRow(key=key))
            db.session.flush()  # the connection is taken, the row written (not committed)
            gate["held"] += 1
            try:
                gate["event"].wait(120)
            finally:
                gate["held"] -= 1
            return {"ok": True, "key": key}

        def on_quick(self, key: str) -> dict[str, Any]:
            db.session.add(OpsRow(key=key))
            return {"ok": True, "key": key}

        def on_fail(self, key: str) -> None:
            raise RuntimeError(f"fail {key}")

    socketio.on_namespace(Ops("/ops"))

    @app.route("/_ops/state")
    def ops_state() -> Any:
        return jsonify(
            held=gate["held"],
            draining=dbctx.draining,
            status=dbctx.status(),
            drained=result["drained"],
        )

    @app.route("/_ops/metrics")
    def ops_metrics() -> Any:
        return jsonify(dbctx.metrics())

    @app.route("/_ops/release")
    def ops_release() -> Any:
        gate["event"].set()
        return jsonify(released=True)

    @app.route("/_ops/drain")
    def ops_drain() -> Any:
        timeout = float(request.args.get("timeout", "10"))

        def run() -> None:
            result["drained"] = dbctx.drain(timeout)

        socketio.start_background_task(run)
        return jsonify(started=True)

    @app.route("/healthz")
    def healthz() -> Any:
        health = dbctx.health_check()
        return jsonify(health), 200 if health["healthy"] else 503

    registry = CollectorRegistry()
    register(dbctx, app, registry)
    app.add_url_rule("/metrics", "metrics", lambda: metrics_response(registry))

    if app.config.get("OPS_SIGNALS"):
        dbctx.drain_on_signals()
