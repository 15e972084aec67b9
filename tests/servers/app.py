"""A small real Socket.IO server, run in its own process by the tests and benchmarks.

    python -m tests.servers.app --async-mode {threading,eventlet,gevent} --port P \
        --database-url URL [--plain | --bare] \
        [--pool-size N --max-overflow N --pool-timeout S] [--set KEY=JSON ...] \
        [--extra MODULE ...] [--message-queue URL] [--log-level LEVEL]

Namespace ``/t`` is a ``DBContextNamespace`` subclass, or with ``--plain`` a plain
``flask_socketio.Namespace`` subclass with the very same handler bodies (a shared
mixin), as a control. ``--bare`` goes further: no socketio_dbctx at all (plain
namespaces, no ``DBContext``, none of its pool listeners), the control the benchmarks
measure against; ``--extra`` modules then get ``dbctx=None`` and ``args.plain`` set.
HTTP routes: ``/_ready``, ``/_stats`` and ``/_start_loop``.

The async mode's monkey patching happens before anything else is imported.
"""

from __future__ import annotations

import sys


def _early_async_mode(argv: list[str]) -> str:
    """The ``--async-mode`` value, read before argparse (which comes after patching)."""
    for index, arg in enumerate(argv):
        if arg == "--async-mode" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--async-mode="):
            return arg.split("=", 1)[1]
    return "threading"


_ASYNC_MODE = _early_async_mode(sys.argv[1:])

if _ASYNC_MODE == "eventlet":
    import eventlet

    eventlet.monkey_patch()  # greens psycopg2 too
elif _ASYNC_MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()

    from psycogreen.gevent import patch_psycopg

    patch_psycopg()

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from typing import Any  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402
from flask_socketio import ConnectionRefusedError as SocketIORefused  # noqa: E402
from flask_socketio import Namespace, SocketIO  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402

from socketio_dbctx import DBContext, DBContextNamespace  # noqa: E402

#: The text of the exception ``boom`` raises; it must never reach a client.
BOOM_SECRET = "boom-secret-detail: SELECT password FROM users"

LOOP_INTERVAL = 0.05

logger = logging.getLogger("tests.servers.app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--async-mode", choices=["threading", "eventlet", "gevent"], default="threading"
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--plain", action="store_true", help="plain flask_socketio.Namespace")
    kind.add_argument(
        "--bare", action="store_true", help="no socketio_dbctx at all (implies --plain)"
    )
    parser.add_argument("--pool-size", type=int, default=5)
    parser.add_argument("--max-overflow", type=int, default=0)
    parser.add_argument("--pool-timeout", type=float, default=30.0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="an app.config value, e.g. --set DBCTX_MAX_RETRIES=0 (repeatable)",
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module whose setup(app, socketio, db, dbctx, args) adds handlers (repeatable)",
    )
    parser.add_argument("--message-queue", default=None)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    args.plain = args.plain or args.bare
    return args


def _config_values(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        values[key] = json.loads(raw)
    return values


def create_app(
    args: argparse.Namespace,
) -> tuple[Flask, SocketIO, SQLAlchemy, DBContext | None]:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=args.database_url,
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": args.pool_size,
            "max_overflow": args.max_overflow,
            "pool_timeout": args.pool_timeout,
        },
    )
    app.config.update(_config_values(args.set))
    db = SQLAlchemy()
    db.init_app(app)
    socketio = SocketIO(
        app,
        async_mode=args.async_mode,
        logger=False,
        engineio_logger=False,
        message_queue=args.message_queue,
    )
    dbctx = None if args.bare else DBContext(app, socketio, db)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "items"
        id = sa.Column(sa.Integer, primary_key=True)
        text = sa.Column(sa.String(200), nullable=False)

    class Handlers:
        """The handler bodies, shared by the DBContext namespace and the plain control."""

        def on_connect(self, auth: Any) -> None:
            if auth == {"refuse": True}:
                raise SocketIORefused("refused by the test server")
            if auth == {"refuse": "builtin"}:
                raise ConnectionRefusedError("refused by the test server (builtin)")

        def on_write(self, text: str) -> dict[str, int]:
            item = Item(text=text)
            db.session.add(item)
            db.session.flush()
            return {"id": item.id}

        def on_count(self, text: str | None = None) -> int:
            query = sa.select(sa.func.count()).select_from(Item)
            if text is not None:
                query = query.where(Item.text == text)
            return int(db.session.execute(query).scalar_one())

        def on_boom(self, text: str = "boom") -> None:
            db.session.add(Item(text=text))
            db.session.flush()  # the INSERT really reaches the database
            raise RuntimeError(BOOM_SECRET)

        def on_hold(self, seconds: float) -> bool:
            db.session.execute(sa.text("SELECT 1"))
            socketio.sleep(float(seconds))  # slow I/O while the session holds its connection
            return True

        def on_whoami(self) -> str:
            return str(request.sid)  # type: ignore[attr-defined]

    if args.plain:

        class PlainT(Handlers, Namespace):  # type: ignore[misc]
            pass

        socketio.on_namespace(PlainT("/t"))
    else:

        class DBContextT(Handlers, DBContextNamespace):
            pass

        socketio.on_namespace(DBContextT("/t"))

    loop_state: dict[str, Any] = {"mode": None, "runs": 0}

    def query_once() -> None:
        db.session.execute(sa.text("SELECT 1"))
        loop_state["runs"] += 1

    def naive_loop() -> None:
        # The usual workaround that holds one app context (and session) forever.
        with app.app_context():
            while True:
                query_once()
                socketio.sleep(LOOP_INTERVAL)

    @app.route("/_ready")
    def ready() -> str:
        return "ok"

    @app.route("/_stats")
    def stats() -> Any:
        return jsonify(
            pool=dbctx.pool_status() if dbctx is not None else None,
            checked_out=db.engine.pool.checkedout(),  # type: ignore[attr-defined]
            loop_mode=loop_state["mode"],
            loop_runs=loop_state["runs"],
            plain=args.plain,
            bare=args.bare,
            async_mode=socketio.async_mode,
        )

    @app.route("/_start_loop")
    def start_loop() -> Any:
        mode = request.args.get("mode")
        if mode not in ("naive", "periodic"):
            return jsonify(error="mode must be naive or periodic"), 400
        if loop_state["mode"] is not None:
            return jsonify(error=f"a {loop_state['mode']} loop is already running"), 409
        if mode == "periodic" and dbctx is None:
            return jsonify(error="a periodic loop needs socketio_dbctx (not --bare)"), 400
        loop_state["mode"] = mode
        if mode == "naive":
            socketio.start_background_task(naive_loop)
        else:
            dbctx.start_periodic_task(query_once, LOOP_INTERVAL)
        return jsonify(started=mode)

    for module_name in args.extra:
        importlib.import_module(module_name).setup(app, socketio, db, dbctx, args)

    with app.app_context():
        db.create_all()
        db.engine.dispose()  # start with an empty pool
    return app, socketio, db, dbctx


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.async_mode != _ASYNC_MODE:  # pragma: no cover - argv sniffing disagreed
        raise SystemExit(f"--async-mode parsed as {args.async_mode!r}, patched {_ASYNC_MODE!r}")
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app, socketio, _db, _dbctx = create_app(args)
    logger.info(
        "test server: async_mode=%s port=%s plain=%s bare=%s pool=%s/%s timeout=%s",
        socketio.async_mode,
        args.port,
        args.plain,
        args.bare,
        args.pool_size,
        args.max_overflow,
        args.pool_timeout,
    )
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
