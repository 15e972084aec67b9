"""The app factory: Flask, Flask-SQLAlchemy, Flask-SocketIO and socketio_dbctx."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, current_app, jsonify, render_template, send_from_directory
from flask_socketio import SocketIO
from sqlalchemy import event

from socketio_dbctx import DBContext, DBContextNamespace, InvalidRequestError, idempotency_key

from . import book, hosts, validation
from .models import Order, Trade, db

#: Everything the page loads comes from the app itself; the browser enforces it too.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)

#: Defaults of the sample app; ``create_app(config=...)`` overrides them.
DEFAULT_CONFIG: dict[str, Any] = {
    "DBCTX_MONITOR_INTERVAL": 1.0,  # the dashboard's chart moves every second
    # a statement running longer is cancelled by the server and acked `timeout`
    "DBCTX_STATEMENT_TIMEOUT": 5.0,
}


class Trading(DBContextNamespace):
    """``/trading``: every handler runs in its own app context and session.

    Broadcasts (``order_placed``, ``trade``, ``order_updated``) go out only after the
    event's transaction has committed: socketio_dbctx holds emits made inside an event
    until its COMMIT and drops them on rollback (``DBCTX_DEFER_EMITS``), and
    ``dbctx.after_commit`` queues any other callback the same way.
    """

    @idempotency_key(validation.client_order_id)
    def on_place_order(self, data: Any) -> dict[str, Any]:
        fields = validation.order_request(data)
        match = book.place(self.db_session, **fields)
        order, trades, touched = match.order, match.trades, match.touched

        def broadcast() -> None:
            self.emit("order_placed", order)
            for trade in trades:
                self.emit("trade", trade)
            for resting in touched:
                self.emit("order_updated", resting)

        current_app.extensions["dbctx"].after_commit(broadcast)
        return {"ok": True, "order": order}

    def on_list_orders(self, data: Any = None) -> dict[str, Any]:
        symbol, limit = validation.list_request(data, "list_orders")
        query = db.select(Order).order_by(Order.created_at.desc(), Order.id.desc()).limit(limit)
        if symbol is not None:
            query = query.where(Order.symbol == symbol)
        return {"orders": [o.to_dict() for o in self.db_session.scalars(query)]}

    def on_list_trades(self, data: Any = None) -> dict[str, Any]:
        symbol, limit = validation.list_request(data, "list_trades")
        query = db.select(Trade).order_by(Trade.created_at.desc(), Trade.id.desc()).limit(limit)
        if symbol is not None:
            query = query.where(Trade.symbol == symbol)
        return {"trades": [t.to_dict() for t in self.db_session.scalars(query)]}

    def on_cancel_order(self, order_id: Any) -> dict[str, Any]:
        """``{"ok": true, "order"}``; ``{"ok": false, "order"}`` when the order is no
        longer open (it filled or was cancelled first); ``invalid_request`` when there
        is no such order."""
        result = book.cancel(self.db_session, validation.order_id(order_id))
        if result is None:
            raise InvalidRequestError("no order with that id")
        if result.ok:
            self.emit("order_updated", result.order)  # held until the commit
        return {"ok": result.ok, "order": result.order}


def _sqlite_wal(dbapi_connection: Any, connection_record: Any) -> None:
    # readers no longer wait for a writer's COMMIT
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def create_app(
    database_url: str | None = None,
    async_mode: str = "threading",
    message_queue: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    monitor_auth: Any = None,
    allowed_hosts: Sequence[str] | None = None,
    trusted_proxies: int = 0,
) -> tuple[Flask, SocketIO]:
    """Build the app and create its tables.

    :param database_url: SQLAlchemy URL; default: SQLite in the instance folder.
    :param async_mode: ``threading``, ``eventlet`` or ``gevent`` (patch before importing).
    :param message_queue: Socket.IO message queue URL, for several workers.
    :param config: extra ``app.config`` (``DBCTX_*`` keys included).
    :param monitor_auth: ``DBCTX_MONITOR_AUTH`` (a token): registers ``/monitor``.
    :param allowed_hosts: host names requests may carry in ``Host`` (``"*"``: any);
        default: the loopback names. Browsers may connect only from these hosts'
        own pages (:mod:`sample_app.hosts`).
    :param trusted_proxies: how many proxies in front of the app set
        ``X-Forwarded-*`` headers; 0 (the default) ignores those headers.
    """
    app = Flask(__name__)
    if database_url is None:
        os.makedirs(app.instance_path, exist_ok=True)
        database_url = "sqlite:///" + os.path.join(app.instance_path, "trading.db")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    app.config.update(DEFAULT_CONFIG)
    app.config.update(config or {})
    db.init_app(app)
    socketio = SocketIO(
        app,
        async_mode=async_mode,
        message_queue=message_queue,
        cors_allowed_origins=hosts.allowed_origin,
    )
    # outermost: every request, the Socket.IO endpoint included, passes the host check
    app.wsgi_app = hosts.guard(  # type: ignore[method-assign]
        app.wsgi_app,
        list(allowed_hosts) if allowed_hosts is not None else list(hosts.LOOPBACK_NAMES),
        trusted_proxies,
    )
    options = {} if monitor_auth is None else {"monitor_auth": monitor_auth}
    dbctx = DBContext(app, socketio, db, **options)
    socketio.on_namespace(Trading("/trading"))

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        # the dashboard URL carries the monitor token
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return send_from_directory(app.static_folder or "static", "favicon.png")

    @app.get("/healthz")
    def healthz() -> Any:
        result = dbctx.health_check()
        return jsonify(result), 200 if result["healthy"] else 503

    try:
        from prometheus_client import CollectorRegistry

        from socketio_dbctx.prometheus import metrics_response, register
    except ImportError:
        pass  # /metrics needs the `prometheus` extra
    else:
        registry = CollectorRegistry()
        register(dbctx, app, registry)
        app.add_url_rule(
            "/metrics", "metrics", lambda: metrics_response(registry), methods=["GET"]
        )

    with app.app_context():
        engine = db.engine
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            event.listen(engine, "connect", _sqlite_wal)
        db.create_all()
        # the table of the stored acks of client order ids (@idempotency_key)
        dbctx.create_tables()
    return app, socketio


def _no_delay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def server_options(async_mode: str) -> dict[str, Any]:
    """Web server options that turn Nagle's algorithm off on every connection.

    An ack and the broadcast right after it are two small WebSocket frames; with
    Nagle on, the second waits for the client's delayed ACK (about 40 ms), which
    the load driver measured as a ~50 ms round trip for a 3 ms event.
    """
    if async_mode == "threading":
        return {"request_handler": _threading_handler()}
    if async_mode == "eventlet":
        from eventlet.wsgi import HttpProtocol

        class Protocol(HttpProtocol):  # type: ignore[misc]
            def setup(self) -> None:
                super().setup()
                _no_delay(self.connection)

        return {"protocol": Protocol}
    if async_mode == "gevent":
        from gevent.pywsgi import WSGIHandler

        class GeventHandler(WSGIHandler):  # type: ignore[misc]
            def handle(self) -> None:
                _no_delay(self.socket)
                super().handle()

            def run_application(self) -> None:
                super().run_application()
                if self.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
                    # the WebSocket (simple-websocket) is over: so is the connection.
                    # Reading on would log the client's close frame as "Invalid http
                    # version: '\x88\x82...'".
                    self.close_connection = True

        return {"handler_class": GeventHandler}
    return {}


def _threading_handler() -> type:
    from werkzeug.serving import WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        disable_nagle_algorithm = True  # socketserver.StreamRequestHandler's switch

        def connection_dropped(self, error: BaseException, environ: Any = None) -> None:
            # simple-websocket ends a WebSocket by raising ConnectionError. The TCP
            # connection is done with HTTP: close it. Reading on would take the
            # client's WebSocket close frame for a request and log it as
            # "code 400, message Bad request syntax ('\x88\x82...')".
            self.close_connection = True

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass  # no access log: the dashboard URL carries the monitor token

    return Handler


def run(app: Flask, socketio: SocketIO, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C ends it quietly).

    threading: Werkzeug's threaded server, run directly rather than through
    ``socketio.run``, which prints a production warning for it. With
    simple-websocket installed it serves WebSocket, which is what the sample needs;
    the same goes for gevent. No access log in any mode: the dashboard URL carries
    the monitor token.
    """
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        if socketio.async_mode == "threading":
            from werkzeug.serving import make_server

            server = make_server(
                host, port, app, threaded=True, request_handler=_threading_handler()
            )
            server.serve_forever()
        elif socketio.async_mode == "gevent":
            _serve_gevent(app, host, port)
        else:
            socketio.run(app, host=host, port=port, log_output=False,
                         **server_options(socketio.async_mode))  # fmt: skip
    except KeyboardInterrupt:
        pass


def _serve_gevent(app: Flask, host: str, port: int) -> None:
    """What ``socketio.run`` does for gevent with simple-websocket, with Ctrl-C
    stopping the server in the hub (a KeyboardInterrupt raised inside whichever
    connection's greenlet runs would print its traceback)."""
    import gevent
    from gevent import pywsgi

    server = pywsgi.WSGIServer((host, port), app, log=None, **server_options("gevent"))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        # only when nothing else owns Ctrl-C: drain_on_signals() does, and must keep it
        gevent.signal_handler(signal.SIGINT, server.stop, 1.0)
    server.serve_forever()


__all__ = ["CONTENT_SECURITY_POLICY", "Trading", "create_app", "run", "server_options"]
