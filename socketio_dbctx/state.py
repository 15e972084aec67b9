"""What socketio_dbctx keeps for one Flask app, and the registry that finds it.

:class:`AppState` owns an app's settings, session source, metrics, checkout tracker
and admission limit; :func:`app_state` finds it for an app (registered by
:class:`~socketio_dbctx.DBContext`, or made with defaults for an app that only has
Flask-SQLAlchemy). Nothing here imports the extension, the namespaces or the monitor.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from flask import Flask
from sqlalchemy.engine import Engine

from . import context
from .admission import ProcessLimit
from .config import Settings, load_settings
from .drivers import check_green_driver, enforce_connect_timeout
from .errors import ContextSetupError
from .health import health_check, probe_failing
from .idempotency import KeyStore
from .leaks import LeakWatchdog, PoolTracker, Stack
from .metrics import EventMetrics
from .pool import pool_capacity, pool_status, worst_status
from .sessions import SessionSource, make_source
from .shapes import HealthResult, MonitorPayload, PoolStatus
from .tasks import spawn
from .throttle import LogThrottle
from .timeouts import reset_on_checkin

if TYPE_CHECKING:
    from flask_socketio import SocketIO

__all__ = ["AppState", "app_state", "describe_checkout", "register", "worker_id"]


def worker_id() -> str:
    """``hostname:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def describe_checkout() -> tuple[str | None, str | None, Stack | None]:
    """Who takes a connection now, for leak reports: the current scope's label, sid
    and handler."""
    scope = context.current_scope()
    if scope is None:
        return None, None, None
    event = scope.event
    if event is None:
        return scope.label, None, None
    # Inside an event the handler says where: no stack walk on the hot path.
    code = getattr(getattr(event.handler, "__func__", event.handler), "__code__", None)
    where = ((code.co_filename, code.co_firstlineno, code.co_name),) if code else None
    return scope.label, event.sid, where


class AppState:
    """Everything socketio_dbctx keeps for one Flask app.

    :param settings: the app's validated settings.
    :param source: where its sessions come from.
    :param socketio: its ``SocketIO`` instance, if known.
    """

    def __init__(
        self, settings: Settings, source: SessionSource, socketio: SocketIO | None
    ) -> None:
        self.settings = settings
        self.source = source
        self.socketio = socketio
        self.metrics = EventMetrics()
        #: which failed events are logged in full (``socketio_dbctx.acks.log_failure``)
        self.log_throttle = LogThrottle()
        self.tracker = PoolTracker(describe_checkout, settings.leak_threshold)
        #: the app's idempotency keys
        self.keys = KeyStore(settings.idempotency_ttl, lambda target: spawn(socketio, target))
        #: the cluster view (several workers on a Redis message queue), when enabled
        self.cluster: Any = None
        self._leak_watchdog: LeakWatchdog | None = None
        self._followed = False
        self._drivers_checked = False
        self._process_limit: ProcessLimit | None = None
        self._lock = threading.RLock()

    @property
    def async_mode(self) -> str | None:
        """The Socket.IO async mode, when a server is known."""
        server = getattr(self.socketio, "server", None)
        return getattr(server, "async_mode", None)

    @property
    def waiting(self) -> int:
        """Events waiting for admission or for a checkout from a full pool right now."""
        admission = self._process_limit.waiting if self._process_limit else 0
        return admission + self.tracker.checkout_waiting

    def sleep(self, seconds: float) -> None:
        """Sleep the async mode's way."""
        if self.socketio is not None and self.socketio.server is not None:
            self.socketio.sleep(seconds)
        else:
            time.sleep(seconds)

    # -- engines --------------------------------------------------------------------

    def engines(self, app: Flask) -> dict[str, Engine]:
        """The app's engines by bind name, ``"default"`` first."""
        return self.source.engines(app)

    def follow(self, app: Flask) -> dict[str, Engine]:
        """Start following ``app``'s engines, once: checkouts and waits for leak
        reports and ``waiting``, the leak watchdog. Returns the engines."""
        engines = self.engines(app)
        if not self._followed:
            with self._lock:
                for engine in engines.values():
                    self.tracker.attach(engine)
                    self.tracker.watch_waits(engine)
                    # the server's mode when known now; else the first event bounds it
                    enforce_connect_timeout(engine, self.async_mode)
                    reset_on_checkin(engine)
                if any(engine.dialect.name == "postgresql" for engine in engines.values()):
                    with app.app_context():  # lost-COMMIT resolution needs them
                        self.source.follow_transactions()
                if self.settings.leak_threshold and self._leak_watchdog is None:
                    self._leak_watchdog = _start_leak_watchdog(self.tracker, self.socketio)
                self._followed = True
        return engines

    def check_drivers(self, app: Flask, async_mode: str | None) -> None:
        """Once the async mode is known (the first event): warn about drivers that
        would block it and bound green psycopg2's connects."""
        if self._drivers_checked:
            return
        with self._lock:
            if self._drivers_checked:
                return
            engines = self.follow(app)
            check_green_driver(engines, async_mode)
            for engine in engines.values():
                enforce_connect_timeout(engine, async_mode)
            self._drivers_checked = True

    def process_limit(self, app: Flask, async_mode: str | None) -> ProcessLimit:
        """The app's process-wide admission limit, made on first use.

        ``DBCTX_MAX_CONCURRENT_EVENTS=None`` means the default engine's pool capacity.
        """
        if self._process_limit is None:
            with self._lock:
                if self._process_limit is None:
                    limit = self.settings.max_concurrent_events
                    if limit is None:
                        default = self.follow(app).get("default")
                        limit = pool_capacity(default) if default is not None else None
                    self._process_limit = ProcessLimit(async_mode, limit)
        return self._process_limit

    # -- drain ----------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called: new events are refused."""
        limit = self._process_limit
        return limit is not None and limit.draining

    def drain(self, app: Flask, timeout: float | None) -> bool:
        """Refuse new events of ``app`` (``busy``), wait up to ``timeout`` seconds for
        the ones in flight; True when none is left. See :meth:`DBContext.drain
        <socketio_dbctx.DBContext.drain>`."""
        return self.process_limit(app, self.async_mode).drain(timeout)

    def health(self, app: Flask, timeout: float) -> HealthResult:
        """``health_check`` of the default engine; not healthy while draining."""
        if self.draining:
            return {"healthy": False, "latency_ms": 0.0, "error": "draining"}
        try:
            engine = self.follow(app).get("default")
        except Exception as exc:
            return {"healthy": False, "latency_ms": 0.0, "error": f"{type(exc).__name__}: {exc}"}
        return health_check(engine, timeout, self.socketio)

    # -- observation ----------------------------------------------------------------

    def pool_statuses(self, app: Flask) -> dict[str, PoolStatus]:
        """Pool dicts of every engine of ``app``: ``draining`` during a drain,
        ``unhealthy`` while the engine's health probes fail."""
        s = self.settings
        draining = self.draining
        return {
            name: pool_status(
                engine,
                name,
                checkouts=self.tracker.checkouts(engine),
                warn_utilization=s.warn_utilization,
                leak_threshold=s.leak_threshold,
                waiting=self.waiting if name == "default" else 0,
                unhealthy=probe_failing(engine),
                draining=draining,
            )
            for name, engine in self.follow(app).items()
        }

    def payload(self, app: Flask) -> MonitorPayload:
        """This worker's monitor payload for ``app``."""
        pools = self.pool_statuses(app)
        return {
            "worker": worker_id(),
            "timestamp": time.time(),
            "status": worst_status([p["status"] for p in pools.values()]),
            "pools": pools,
            "events": self.metrics.snapshot(),
            "leaks": self.tracker.scan(),
        }


def _start_leak_watchdog(tracker: PoolTracker, socketio: SocketIO | None) -> LeakWatchdog:
    # Nothing here may refer to the AppState: the watchdog ends when the state is gone.
    sleep = socketio.sleep if socketio is not None and socketio.server else time.sleep
    return LeakWatchdog(tracker, lambda target: spawn(socketio, target), sleep)


# -- the registry ---------------------------------------------------------------------

_states: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def register(app: Flask, state: AppState) -> None:
    """Make ``state`` the state of ``app`` (done by ``DBContext.init_app``)."""
    with _LOCK:
        _states[app] = state


def app_state(app: Flask, socketio: SocketIO | None = None) -> AppState:
    """The state of ``app``: from its DBContext, else defaults over Flask-SQLAlchemy.

    :param socketio: the app's ``SocketIO``, for a state made with defaults.
    :raises ContextSetupError: when the app has neither.
    """
    state = _states.get(app)
    if state is None:
        with _LOCK:
            state = _states.get(app)
            if state is None:
                if "sqlalchemy" not in app.extensions:
                    raise ContextSetupError(
                        "no database is configured for socketio_dbctx: call "
                        "DBContext(app, socketio, db) (or DBContext(app, socketio, "
                        "session_factory=...)), or initialise Flask-SQLAlchemy on this app "
                        "with db.init_app(app)"
                    )
                settings = load_settings(app.config, {})
                state = _states[app] = AppState(settings, make_source(None, None), socketio)
    return state
