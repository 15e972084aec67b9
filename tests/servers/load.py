"""Load handlers for the admission tests and the benchmarks: ``--extra tests.servers.load``.

Namespace ``/l`` is a ``DBContextNamespace``, or with ``--plain`` (and ``--bare``) a
plain ``flask_socketio.Namespace`` with the very same handler bodies (a shared mixin):

* ``pg_sleep(seconds)``: ``SELECT pg_sleep(seconds)``: the handler holds its pooled
  connection for ``seconds`` inside the database;
* ``hold(seconds)``: ``SELECT 1``, then ``socketio.sleep(seconds)`` while the session
  keeps its connection (slow I/O after a query, DESIGN section 1, case 3);
* ``quick()``: ``SELECT 1``, returns 1.

The connect handler touches no database and counts connects. With
``--set LOAD_BACKGROUND="periodic"`` (or ``"naive"``) every client that connects gets
a task of its own that queries the database every ``LOAD_INTERVAL`` seconds (default
1.0) and emits ``tick`` to that client: ``periodic`` through
``dbctx.start_periodic_task`` (one scope per run), ``naive`` as ``with
app.app_context(): while True: ...; socketio.sleep(interval)``. A failed run is
counted (pool timeouts apart) and the task goes on; it ends when its client leaves.

Routes: ``GET /_load/peak`` returns the figures since the last ``GET /_load/reset``:
``peak`` is exact (the pool's ``checkout`` event reads ``checkedout()`` at every
checkout; a reset starts it at the connections checked out right then);
``sampled_peak`` and ``waiting_peak`` come from a background task that samples the
pool every few milliseconds (``samples`` counts them; ``--set LOAD_SAMPLER=false``,
and ``--bare``, turn it off); ``connects``; and the background tasks'
``tasks_started``, ``task_runs``, ``task_errors`` and ``pool_timeouts``.

Imported only by the server process (``tests.servers.app``), after monkey patching.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from typing import Any, Callable

import sqlalchemy as sa
from flask import Flask, jsonify, request
from flask_socketio import Namespace, SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace

NAMESPACE = "/l"
SAMPLE_INTERVAL = 0.005
BACKGROUND_MODES = ("none", "periodic", "naive")


class _Figures:
    """Peaks of checked-out and waiting connections, and counters, since a reset."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset(0)

    def reset(self, checked_out: int) -> None:
        self.peak = checked_out
        self.sampled_peak = 0
        self.waiting_peak = 0
        self.samples = 0
        self.connects = 0
        self.tasks_started = 0
        self.task_runs = 0
        self.task_errors = 0
        self.pool_timeouts = 0

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {key: value for key, value in vars(self).items() if key != "lock"}


def setup(
    app: Flask,
    socketio: SocketIO,
    db: SQLAlchemy,
    dbctx: DBContext | None,
    args: argparse.Namespace,
) -> None:
    figures = _Figures()
    background = str(app.config.get("LOAD_BACKGROUND", "none"))
    interval = float(app.config.get("LOAD_INTERVAL", 1.0))
    if background not in BACKGROUND_MODES:
        raise SystemExit(f"LOAD_BACKGROUND must be one of {BACKGROUND_MODES}, got {background!r}")
    if background == "periodic" and dbctx is None:
        raise SystemExit('LOAD_BACKGROUND="periodic" needs socketio_dbctx (not --bare)')
    with app.app_context():
        engine = db.engine

    @sa.event.listens_for(engine, "checkout")
    def on_checkout(*_: Any) -> None:
        out = engine.pool.checkedout()  # type: ignore[attr-defined]
        with figures.lock:
            figures.peak = max(figures.peak, out)

    def sampler(dbctx: DBContext) -> None:
        while True:
            out = engine.pool.checkedout()  # type: ignore[attr-defined]
            waiting = dbctx.pool_status()["waiting"]
            with figures.lock:
                figures.sampled_peak = max(figures.sampled_peak, out)
                figures.waiting_peak = max(figures.waiting_peak, waiting)
                figures.samples += 1
            socketio.sleep(SAMPLE_INTERVAL)

    def tick(sid: str) -> None:
        """One run of a client's background task: query, then push the result."""
        try:
            now = db.session.execute(sa.text("SELECT now()")).scalar_one()
        except Exception as exc:
            figures.add("task_errors")
            if isinstance(exc, sa.exc.TimeoutError):
                figures.add("pool_timeouts")
            raise
        figures.add("task_runs")
        socketio.emit("tick", now.isoformat(), to=sid, namespace=NAMESPACE)

    stops: dict[str, Callable[[], Any]] = {}

    def start_task(sid: str) -> None:
        figures.add("tasks_started")
        if dbctx is not None and background == "periodic":
            stops[sid] = dbctx.start_periodic_task(tick, interval, sid).stop
            return
        running = [True]

        def naive_loop() -> None:
            # The usual workaround: one app context (and session) for the whole loop.
            with app.app_context():
                while running[0]:
                    with contextlib.suppress(Exception):  # counted by tick()
                        tick(sid)
                    socketio.sleep(interval)

        socketio.start_background_task(naive_loop)
        stops[sid] = lambda: running.__setitem__(0, False)

    class Handlers:
        """The handler bodies, shared by the DBContext namespace and the plain control."""

        def on_connect(self, auth: Any = None) -> None:
            figures.add("connects")
            if background != "none":
                start_task(str(request.sid))  # type: ignore[attr-defined]

        def on_disconnect(self, reason: Any = None) -> None:
            stop = stops.pop(str(request.sid), None)  # type: ignore[attr-defined]
            if stop is not None:
                stop()

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
        return jsonify(figures.snapshot())

    @app.route("/_load/reset")
    def load_reset() -> Any:
        with figures.lock:
            figures.reset(engine.pool.checkedout())  # type: ignore[attr-defined]
        return jsonify(figures.snapshot())

    if dbctx is not None and app.config.get("LOAD_SAMPLER", True):
        socketio.start_background_task(sampler, dbctx)
