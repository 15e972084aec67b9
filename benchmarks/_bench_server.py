"""The Socket.IO server the benchmarks measure, run in its own process.

    python benchmarks/_bench_server.py --async-mode eventlet --port P --database-url URL \
        [--plain] [--pool-size 5 --max-overflow 0 --pool-timeout 30] [--set KEY=JSON ...] \
        [--background none|periodic|naive] [--interval 1.0]

Namespace ``/b`` is a ``DBContextNamespace`` or, with ``--plain``, a plain
``flask_socketio.Namespace``; both run the very same handler bodies (a shared mixin):

* ``pg_sleep(seconds)``: ``SELECT pg_sleep(seconds)``, holding the connection;
* ``quick()``: ``SELECT 1``.

``--background``: every client that connects gets its own task that queries the
database every ``--interval`` seconds and emits ``tick`` to that client:
``periodic`` through ``dbctx.start_periodic_task`` (one scope per run), ``naive`` as
``with app.app_context(): while True: ...; socketio.sleep(interval)``. A pool timeout
in a task is counted and the task goes on. The task ends when its client leaves.

Routes: ``/_ready``; ``/_stats`` (pool dict, exact peak of checked_out since the last
``/_reset``, task counters).
"""

from __future__ import annotations

import sys


def _early_async_mode(argv: list[str]) -> str:
    for index, arg in enumerate(argv):
        if arg == "--async-mode" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--async-mode="):
            return arg.split("=", 1)[1]
    return "eventlet"


_ASYNC_MODE = _early_async_mode(sys.argv[1:])

if _ASYNC_MODE == "eventlet":
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eventlet's own deprecation notice
        import eventlet

    eventlet.monkey_patch()  # greens psycopg2 too
elif _ASYNC_MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()

    from psycogreen.gevent import patch_psycopg

    patch_psycopg()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
from typing import Any, Callable  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402
from flask_socketio import Namespace, SocketIO  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402

from socketio_dbctx import DBContext, DBContextNamespace  # noqa: E402

NAMESPACE = "/b"
logger = logging.getLogger("bench_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--async-mode", choices=["threading", "eventlet", "gevent"], default="eventlet"
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--pool-size", type=int, default=5)
    parser.add_argument("--max-overflow", type=int, default=0)
    parser.add_argument("--pool-timeout", type=float, default=30.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--background", choices=["none", "periodic", "naive"], default="none")
    parser.add_argument("--interval", type=float, default=1.0)
    return parser.parse_args(argv)


class Counters:
    """Shared counters, read by ``/_stats``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.peak = 0
        self.task_runs = 0
        self.task_errors = 0
        self.pool_timeouts = 0
        self.tasks_started = 0

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "peak": self.peak,
                "task_runs": self.task_runs,
                "task_errors": self.task_errors,
                "pool_timeouts": self.pool_timeouts,
                "tasks_started": self.tasks_started,
            }


def create_app(args: argparse.Namespace) -> tuple[Flask, SocketIO]:
    app = Flask("bench_server")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=args.database_url,
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": args.pool_size,
            "max_overflow": args.max_overflow,
            "pool_timeout": args.pool_timeout,
        },
    )
    for pair in args.set:
        key, _, raw = pair.partition("=")
        app.config[key] = json.loads(raw)
    db = SQLAlchemy()
    db.init_app(app)
    socketio = SocketIO(app, async_mode=args.async_mode, logger=False, engineio_logger=False)
    # The plain side carries none of socketio_dbctx (no pool listeners either).
    dbctx = None if args.plain else DBContext(app, socketio, db)
    counters = Counters()
    with app.app_context():
        engine = db.engine

    @sa.event.listens_for(engine, "checkout")
    def on_checkout(*_: Any) -> None:
        out = engine.pool.checkedout()  # type: ignore[attr-defined]
        with counters.lock:
            counters.peak = max(counters.peak, out)

    stops: dict[str, Callable[[], Any]] = {}

    def tick(sid: str) -> None:
        """One run of a background task: query, then push the result to the client."""
        try:
            now = db.session.execute(sa.text("SELECT now()")).scalar_one()
        except Exception as exc:
            counters.add("task_errors")
            if isinstance(exc, sa.exc.TimeoutError):
                counters.add("pool_timeouts")
            raise
        counters.add("task_runs")
        socketio.emit("tick", now.isoformat(), to=sid, namespace=NAMESPACE)

    def start_task(sid: str) -> None:
        counters.add("tasks_started")
        if args.background == "periodic":
            if dbctx is None:
                raise SystemExit("--background periodic needs socketio_dbctx (not --plain)")
            handle = dbctx.start_periodic_task(tick, args.interval, sid)
            stops[sid] = handle.stop
        elif args.background == "naive":
            running = [True]

            def naive_loop() -> None:
                # The usual workaround: one app context (and session) for the whole loop.
                with app.app_context():
                    while running[0]:
                        with contextlib.suppress(Exception):  # counted by tick()
                            tick(sid)
                        socketio.sleep(args.interval)

            socketio.start_background_task(naive_loop)
            stops[sid] = lambda: running.__setitem__(0, False)

    class Handlers:
        """The handler bodies, shared by the DBContext namespace and the plain one."""

        def on_connect(self, auth: Any = None) -> None:
            if args.background != "none":
                start_task(str(request.sid))  # type: ignore[attr-defined]

        def on_disconnect(self, reason: Any = None) -> None:
            stop = stops.pop(str(request.sid), None)  # type: ignore[attr-defined]
            if stop is not None:
                stop()

        def on_pg_sleep(self, seconds: float) -> bool:
            db.session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": float(seconds)})
            return True

        def on_quick(self) -> int:
            return int(db.session.execute(sa.text("SELECT 1")).scalar_one())

    if args.plain:

        class PlainB(Handlers, Namespace):  # type: ignore[misc]
            pass

        socketio.on_namespace(PlainB(NAMESPACE))
    else:

        class OursB(Handlers, DBContextNamespace):
            pass

        socketio.on_namespace(OursB(NAMESPACE))

    @app.route("/_ready")
    def ready() -> str:
        return "ok"

    @app.route("/_stats")
    def stats() -> Any:
        pool = engine.pool
        return jsonify(
            pool=dbctx.pool_status() if dbctx is not None else {"size": pool.size()},  # type: ignore[attr-defined]
            checked_out=engine.pool.checkedout(),  # type: ignore[attr-defined]
            plain=args.plain,
            async_mode=socketio.async_mode,
            **counters.snapshot(),
        )

    @app.route("/_reset")
    def reset() -> Any:
        with counters.lock:
            counters.peak = engine.pool.checkedout()  # type: ignore[attr-defined]
            counters.task_runs = counters.task_errors = counters.pool_timeouts = 0
        return jsonify(counters.snapshot())

    with app.app_context():
        db.create_all()
        engine.dispose()  # start with an empty pool
    return app, socketio


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app, socketio = create_app(args)
    socketio.run(
        app,
        host="127.0.0.1",
        port=args.port,
        debug=False,
        use_reloader=False,
        log_output=False,
        allow_unsafe_werkzeug=True,
    )


if __name__ == "__main__":
    main()
