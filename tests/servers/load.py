"""Load handlers for the admission tests: ``--extra tests.servers.load``.

Namespace ``/l`` is a ``DBContextNamespace``, or with ``--plain`` a plain
``flask_socketio.Namespace`` with the very same handler bodies (a shared mixin):

* ``pg_sleep(seconds)``: ``SELECT pg_sleep(seconds)``: the handler holds its pooled
  connection for ``seconds`` inside the database;
* ``hold(seconds)``: ``SELECT 1``, then ``socketio.sleep(seconds)`` while the session
  keeps its connection (slow I/O after a query, DESIGN section 1, case 3);
* ``quick()``: ``SELECT 1``, returns 1.

The connect handler touches no database and counts connects.

Routes: ``GET /_load/peak`` returns the peaks since the last ``GET /_load/reset``:
``peak`` is exact (the pool's ``checkout`` event reads ``checkedout()`` at every
checkout), ``sampled_peak`` and ``waiting_peak`` come from a background task that
samples the pool every few milliseconds; ``samples`` counts those samples.

Imported only by the server process (``tests.servers.app``), after monkey patching.
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

import sqlalchemy as sa
from flask import Flask, jsonify
from flask_socketio import Namespace, SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace

NAMESPACE = "/l"
SAMPLE_INTERVAL = 0.005


class _Peaks:
    """The highest checked-out count (exact and sampled) and waiting count seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.peak = 0
        self.sampled_peak = 0
        self.waiting_peak = 0
        self.samples = 0
        self.connects = 0

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "peak": self.peak,
                "sampled_peak": self.sampled_peak,
                "waiting_peak": self.waiting_peak,
                "samples": self.samples,
                "connects": self.connects,
            }


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    peaks = _Peaks()
    with app.app_context():
        engine = db.engine

    @sa.event.listens_for(engine, "checkout")
    def on_checkout(*_: Any) -> None:
        out = engine.pool.checkedout()  # type: ignore[attr-defined]
        with peaks.lock:
            peaks.peak = max(peaks.peak, out)

    def sampler() -> None:
        while True:
            out = engine.pool.checkedout()  # type: ignore[attr-defined]
            waiting = dbctx.pool_status()["waiting"]
            with peaks.lock:
                peaks.sampled_peak = max(peaks.sampled_peak, out)
                peaks.waiting_peak = max(peaks.waiting_peak, waiting)
                peaks.samples += 1
            socketio.sleep(SAMPLE_INTERVAL)

    class Handlers:
        """The handler bodies, shared by the DBContext namespace and the plain control."""

        def on_connect(self, auth: Any = None) -> None:
            with peaks.lock:
                peaks.connects += 1

        def on_pg_sleep(self, seconds: float) -> bool:
            db.session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": float(seconds)})
            return True

        def on_hold(self, seconds: float) -> bool:
            db.session.execute(sa.text("SELECT 1"))
            socketio.sleep(float(seconds))  # slow I/O while the session holds its connection
            return True

        def on_quick(self) -> int:
            return int(db.session.execute(sa.text("SELECT 1")).scalar_one())

    if args.plain:

        class PlainL(Handlers, Namespace):  # type: ignore[misc]
            pass

        socketio.on_namespace(PlainL(NAMESPACE))
    else:

        class DBContextL(Handlers, DBContextNamespace):
            pass

        socketio.on_namespace(DBContextL(NAMESPACE))

    @app.route("/_load/peak")
    def load_peak() -> Any:
        return jsonify(peaks.snapshot())

    @app.route("/_load/reset")
    def load_reset() -> Any:
        with peaks.lock:
            peaks.reset()
        return jsonify(peaks.snapshot())

    socketio.start_background_task(sampler)
