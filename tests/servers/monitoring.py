"""Extra handlers for the monitoring tests: ``--extra tests.servers.monitoring``.

Namespace ``/mon`` (a ``DBContextNamespace``):

- ``grab(key, limit=60)``: takes a pooled connection (``SELECT 1``) and holds it until
  ``GET /_mon/release`` lets it go (or ``limit`` seconds pass); acks ``True``. The
  leak reports name this function as the place the connection was taken.

HTTP routes:

- ``/_mon/monitor``: the ``/monitor`` namespace as seen from inside the server:
  ``registered``, ``subscribers``, ``loop_running``, ``snapshots`` (monitor payloads
  built so far: the periodic work), ``held`` (grabs holding a connection now) and
  ``waiting`` (grabs that asked for a connection but hold none yet).
- ``/_mon/release?key=K``: releases the grab ``K``, or every grab without ``key``.
- ``/_mon/auth_calls``: the auth payloads the monitor's auth callable was given.
- ``/metrics``: the Prometheus text of ``socketio_dbctx.prometheus``.

App config (``--set``):

- ``MONITORING_AUTH_CALLABLE=true``: ``DBCTX_MONITOR_AUTH`` (which must be set, so the
  monitor is registered) is replaced by a callable that lets ``{"token": "cb-ok"}`` in,
  refuses anything else, and raises for ``{"token": "raise"}``.
- ``MONITORING_ADMIN_UI=true``: the Socket.IO Admin UI (``socketio.server.instrument``,
  namespace ``/admin``, no auth).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import sqlalchemy as sa
from flask import Flask, jsonify, request
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from prometheus_client import CollectorRegistry

from socketio_dbctx import DBContext, DBContextNamespace, MonitorNamespace
from socketio_dbctx.prometheus import metrics_response, register
from socketio_dbctx.state import app_state

#: The token the auth callable accepts; ``RAISE_TOKEN`` makes it raise.
CALLABLE_TOKEN = "cb-ok"
RAISE_TOKEN = "raise"


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    state = app_state(app, socketio)
    held: dict[str, Any] = {}  # key -> the async mode's event that releases the grab
    counters = {"snapshots": 0}

    # -- the monitor's periodic work, counted ---------------------------------------------
    build_events = state.metrics.snapshot

    def counted_snapshot() -> dict[str, dict[str, Any]]:
        # every monitor payload (push, get_status) reads the event metrics once
        counters["snapshots"] += 1
        return build_events()

    state.metrics.snapshot = counted_snapshot  # type: ignore[method-assign]

    # -- a callable DBCTX_MONITOR_AUTH --------------------------------------------------------
    auth_calls: list[Any] = []

    def monitor_auth(auth: Any) -> bool:
        auth_calls.append(auth)
        token = auth.get("token")
        if token == RAISE_TOKEN:
            raise RuntimeError("the auth backend is down")
        return bool(token == CALLABLE_TOKEN)

    if app.config.get("MONITORING_AUTH_CALLABLE"):
        if state.settings.monitor_auth is None:
            raise SystemExit("MONITORING_AUTH_CALLABLE needs DBCTX_MONITOR_AUTH set")
        state.settings = state.settings.override({"monitor_auth": monitor_auth})

    if app.config.get("MONITORING_ADMIN_UI"):
        socketio.server.instrument(auth=False)

    # -- a handler that holds its connection until released -----------------------------------
    class Mon(DBContextNamespace):
        def on_grab(self, key: str, limit: float = 60.0) -> bool:
            release = socketio.server.eio.create_event()
            db.session.execute(sa.text("SELECT 1"))  # the connection is taken here
            held[key] = release
            try:
                release.wait(float(limit))
            finally:
                held.pop(key, None)
            return True

    socketio.on_namespace(Mon("/mon"))

    def monitor() -> MonitorNamespace | None:
        handler = socketio.server.namespace_handlers.get(state.settings.monitor_namespace)
        return handler if isinstance(handler, MonitorNamespace) else None

    @app.route("/_mon/monitor")
    def monitor_state() -> Any:
        namespace = monitor()
        return jsonify(
            registered=namespace is not None,
            subscribers=namespace.subscribers if namespace is not None else 0,
            loop_running=namespace.loop_running if namespace is not None else False,
            snapshots=counters["snapshots"],
            held=len(held),
            now=time.time(),
        )

    @app.route("/_mon/release")
    def release() -> Any:
        key = request.args.get("key")
        keys = [key] if key is not None else list(held)
        released = []
        for name in keys:
            event = held.get(name)
            if event is not None:
                event.set()
                released.append(name)
        return jsonify(released=released)

    @app.route("/_mon/auth_calls")
    def auth_calls_view() -> Any:
        return jsonify(calls=auth_calls)

    registry = CollectorRegistry()
    register(dbctx, app, registry)
    app.add_url_rule("/metrics", "metrics", lambda: metrics_response(registry))
