"""The Flask extension: ``DBContext(app=None, socketio=None, db=None, ...)`` + ``init_app``."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from flask import Flask, current_app, has_app_context
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import context
from .admission import ProcessLimit
from .cluster import ClusterView, cluster_redis_url
from .config import Settings, load_settings
from .drivers import enforce_connect_timeout
from .errors import ContextSetupError
from .health import health_check
from .leaks import LeakWatchdog, PoolTracker, Stack
from .metrics import EventMetrics
from .monitor import MonitorNamespace
from .pool import pool_capacity, pool_status, worst_status
from .sessions import SessionFactory, SessionSource, make_source
from .tasks import PeriodicTask, spawn

if TYPE_CHECKING:
    from flask_socketio import SocketIO
    from flask_sqlalchemy import SQLAlchemy

__all__ = ["AppState", "DBContext", "app_state"]

logger = logging.getLogger("socketio_dbctx")

T = TypeVar("T")


def _describe_checkout() -> tuple[str | None, str | None, Stack | None]:
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
    """Everything socketio_dbctx keeps for one Flask app."""

    def __init__(
        self, settings: Settings, source: SessionSource, socketio: SocketIO | None
    ) -> None:
        self.settings = settings
        self.source = source
        self.socketio = socketio
        self.metrics = EventMetrics()
        self.tracker = PoolTracker(_describe_checkout, settings.leak_threshold)
        self._watchdog: LeakWatchdog | None = None
        self._tracking = False
        self.drivers_checked = False
        #: the cluster view (several workers on a Redis message queue), when enabled
        self.cluster: Any = None
        self._process_limit: ProcessLimit | None = None
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Events waiting for admission or for a checkout from a full pool right now."""
        admission = self._process_limit.waiting if self._process_limit else 0
        return admission + self.tracker.checkout_waiting

    def process_limit(self, app: Flask, async_mode: str | None) -> ProcessLimit:
        """The app's process-wide admission limit, made on first use.

        ``DBCTX_MAX_CONCURRENT_EVENTS=None`` means the default engine's pool capacity.
        """
        if self._process_limit is None:
            with self._lock:
                if self._process_limit is None:
                    limit = self.settings.max_concurrent_events
                    if limit is None:
                        default = self.engines(app).get("default")
                        limit = pool_capacity(default) if default is not None else None
                    self._process_limit = ProcessLimit(async_mode, limit)
        return self._process_limit

    def sleep(self, seconds: float) -> None:
        """Sleep the async mode's way."""
        if self.socketio is not None and self.socketio.server is not None:
            self.socketio.sleep(seconds)
        else:
            time.sleep(seconds)

    def track(self, app: Flask) -> None:
        """Make sure the leak tracker follows ``app``'s engines (cheap after the first call)."""
        if not self._tracking:
            self.engines(app)
            self._tracking = True

    def engines(self, app: Flask) -> dict[str, Engine]:
        """The app's engines by bind name, each followed by the checkout tracker."""
        engines = self.source.engines(app)
        for engine in engines.values():
            self.tracker.watch_waits(engine)
            if self.tracker.attach(engine):  # first sight of this engine
                enforce_connect_timeout(engine, self.async_mode)
                if self.settings.leak_threshold and not self._watchdog:
                    self._watchdog = _watchdog(self.tracker, self.socketio)
        return engines

    @property
    def async_mode(self) -> str | None:
        """The Socket.IO async mode, when a server is known."""
        server = getattr(self.socketio, "server", None)
        return getattr(server, "async_mode", None)

    def pool_statuses(self, app: Flask) -> dict[str, dict[str, Any]]:
        """Pool dicts of every engine of ``app``."""
        s = self.settings
        return {
            name: pool_status(
                engine,
                name,
                checkouts=self.tracker.checkouts(engine),
                warn_utilization=s.warn_utilization,
                leak_threshold=s.leak_threshold,
                waiting=self.waiting if name == "default" else 0,
            )
            for name, engine in self.engines(app).items()
        }


def _watchdog(tracker: PoolTracker, socketio: SocketIO | None) -> LeakWatchdog:
    # Nothing here may refer to the AppState: the watchdog ends when the state is gone.
    sleep = socketio.sleep if socketio is not None and socketio.server else time.sleep
    return LeakWatchdog(tracker, lambda target: spawn(socketio, target), sleep)


# Apps that use DBContextNamespace with Flask-SQLAlchemy but no DBContext.
_implicit: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
_IMPLICIT_LOCK = threading.Lock()


def app_state(app: Flask, socketio: SocketIO | None = None) -> AppState:
    """The state of ``app``: from its DBContext, else defaults over Flask-SQLAlchemy.

    :raises ContextSetupError: when the app has neither.
    """
    ext = app.extensions.get("dbctx")
    if isinstance(ext, DBContext):
        return ext._state(app)
    state = _implicit.get(app)
    if state is None:
        with _IMPLICIT_LOCK:
            state = _implicit.get(app) or _implicit_state(app, socketio)
    return state


def _implicit_state(app: Flask, socketio: SocketIO | None) -> AppState:
    if "sqlalchemy" not in app.extensions:
        raise ContextSetupError(
            "no database is configured for socketio_dbctx: call DBContext(app, socketio, db) "
            "(or DBContext(app, socketio, session_factory=...)), or initialise "
            "Flask-SQLAlchemy on this app with db.init_app(app)"
        )
    state = _implicit[app] = AppState(
        load_settings(app.config, {}), make_source(None, None), socketio
    )
    return state


class DBContext:
    """Per-event app contexts and sessions for a Flask-SocketIO app.

    :param app: the Flask app, or ``None`` to call :meth:`init_app` later.
    :param socketio: the ``SocketIO`` instance (for background tasks and the monitor).
    :param db: the Flask-SQLAlchemy instance; omitted: ``app.extensions["sqlalchemy"]``.
    :param session_factory: a plain SQLAlchemy ``sessionmaker`` or ``scoped_session``
        instead of Flask-SQLAlchemy.
    :param options: settings by lower-case name without prefix (``max_retries=0``);
        they override ``app.config``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        socketio: SocketIO | None = None,
        db: SQLAlchemy | None = None,
        *,
        session_factory: SessionFactory | None = None,
        **options: Any,
    ) -> None:
        self.socketio = socketio
        self.db = db
        self.session_factory = session_factory
        self.options = options
        self._states: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(
        self,
        app: Flask,
        socketio: SocketIO | None = None,
        db: SQLAlchemy | None = None,
        *,
        session_factory: SessionFactory | None = None,
        **options: Any,
    ) -> None:
        """Register on ``app``; arguments given here win over the constructor's.

        :raises RuntimeError: when a DBContext is already registered on ``app``.
        :raises ContextSetupError: for an invalid setting, naming its key.
        """
        if "dbctx" in app.extensions:
            raise RuntimeError(
                "a DBContext is already registered on this app; create one DBContext and "
                "call init_app(app) once per app, or reuse app.extensions['dbctx']"
            )
        settings = load_settings(app.config, {**self.options, **options})
        # init_app's own database arguments, if any, replace the constructor's pair
        if db is None and session_factory is None:
            db, session_factory = self.db, self.session_factory
        source = make_source(db, session_factory)
        socketio = socketio or self.socketio
        if socketio is not None and getattr(socketio, "server", None) is None:
            logger.warning(
                "DBContext.init_app ran before socketio.init_app(app): the /monitor namespace "
                "and the cluster view need the Socket.IO server; initialise SocketIO first"
            )
        state = AppState(settings, source, socketio)
        self._states[app] = state
        app.extensions["dbctx"] = self
        try:
            # follow checkouts from the start, when the database is already set up
            state.track(app)
        except (ContextSetupError, KeyError, RuntimeError):
            logger.debug("database not set up yet; checkouts are tracked from first use")
        if socketio is not None and settings.monitor_auth is not None:
            if settings.monitor_auth is False:
                logger.warning(
                    "DBCTX_MONITOR_AUTH is False: %s is open to anyone who can connect",
                    settings.monitor_namespace,
                )
            monitor = MonitorNamespace(settings.monitor_namespace)
            socketio.on_namespace(monitor)
            url = cluster_redis_url(settings.cluster_redis_url, socketio)
            if url is not None:
                state.cluster = ClusterView(
                    url, app, state, monitor, lambda target: spawn(socketio, target), state.sleep
                )

    # -- app resolution -------------------------------------------------------------

    def _state(self, app: Flask) -> AppState:
        state = self._states.get(app)
        if state is None:
            raise ContextSetupError(
                "this DBContext is not registered on that app: call dbctx.init_app(app) first"
            )
        return state

    def _app(self) -> Flask:
        if has_app_context():
            app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
            if app in self._states:
                return app
        apps = list(self._states.keys())
        if len(apps) == 1:
            return apps[0]
        raise ContextSetupError(
            "cannot tell which app to use: call this inside `with app.app_context():`, "
            "or register this DBContext on exactly one app"
            if apps
            else "this DBContext is not registered on any app: call dbctx.init_app(app) first"
        )

    def settings(self, app: Flask | None = None) -> Settings:
        """The validated settings of ``app`` (default: the current or only app)."""
        return self._state(app or self._app()).settings

    # -- scopes and tasks -----------------------------------------------------------

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A fresh app context and session: commit on success, roll back on error,
        always removed. Yields the session."""
        app = self._app()
        state = self._state(app)
        state.track(app)
        with context.session_scope(
            app, state.source, commit_on_success=state.settings.commit_on_success
        ) as session:
            yield session

    def run_in_context(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``func(*args, **kwargs)`` inside :meth:`session_scope`."""
        with self.session_scope():
            return func(*args, **kwargs)

    def start_background_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Like ``socketio.start_background_task``, but ``func`` runs inside its own
        scope; an exception is logged with its traceback."""
        app = self._app()
        state = self._state(app)
        state.track(app)

        label = f"task:{getattr(func, '__name__', 'task')}"

        def task() -> None:
            try:
                with context.session_scope(
                    app,
                    state.source,
                    commit_on_success=state.settings.commit_on_success,
                    label=label,
                ):
                    func(*args, **kwargs)
            except Exception:
                logger.exception("background task %s failed", getattr(func, "__name__", func))

        return spawn(state.socketio, task)

    def start_periodic_task(
        self, func: Callable[..., Any], interval: float, *args: Any, **kwargs: Any
    ) -> PeriodicTask:
        """Run ``func(*args, **kwargs)`` every ``interval`` seconds, each run in its own
        scope; no connection is held between runs. An exception is logged and the loop
        goes on. Returns a handle with ``stop()``.

        :raises ValueError: for a non-callable ``func`` or an ``interval`` <= 0.
        """
        if not callable(func):
            raise ValueError(f"func must be callable, got {type(func).__name__}")
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not interval > 0
        ):
            raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")
        app = self._app()
        state = self._state(app)
        state.track(app)

        label = f"periodic:{getattr(func, '__name__', 'task')}"

        def run_once() -> None:
            with context.session_scope(
                app, state.source, commit_on_success=state.settings.commit_on_success, label=label
            ):
                func(*args, **kwargs)

        return PeriodicTask(
            state.socketio, run_once, float(interval), getattr(func, "__name__", repr(func))
        )

    # -- observation ----------------------------------------------------------------

    def pool_status(self, bind: str | None = None) -> dict[str, Any]:
        """The pool dict of one bind (``None`` or ``"default"``: the default engine).

        :raises KeyError: for an unknown bind name.
        """
        statuses = self.pool_status_all()
        name = bind or "default"
        if name not in statuses:
            raise KeyError(f"no bind named {name!r}; known binds: {', '.join(statuses)}")
        return statuses[name]

    def pool_status_all(self) -> dict[str, dict[str, Any]]:
        """``{bind_name: pool dict}``, with ``"default"`` for the default engine."""
        app = self._app()
        return self._state(app).pool_statuses(app)

    def status(self) -> str:
        """The worst status of all pools."""
        return worst_status([p["status"] for p in self.pool_status_all().values()])

    def health_check(self, timeout: float = 2.0) -> dict[str, Any]:
        """Run ``SELECT 1`` on the default engine within ``timeout`` seconds; never raises.

        :returns: ``{"healthy": bool, "latency_ms": float, "error": str | None}``.
        """
        try:
            app = self._app()
            state = self._state(app)
            engine = state.engines(app).get("default")
        except Exception as exc:
            return {"healthy": False, "latency_ms": 0.0, "error": f"{type(exc).__name__}: {exc}"}
        return health_check(engine, timeout, state.socketio)

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Per-event counters and latency percentiles, keyed ``"namespace:event"``."""
        return self._state(self._app()).metrics.snapshot()
