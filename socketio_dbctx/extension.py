"""The Flask extension: ``DBContext(app=None, socketio=None, db=None, ...)`` + ``init_app``.

A thin facade: it registers an :class:`~socketio_dbctx.state.AppState` per app,
wires the ``/monitor`` namespace and the cluster view, and opens scopes and tasks
for the app it is called in.
"""

from __future__ import annotations

import logging
import signal
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from flask import Flask, current_app, has_app_context
from sqlalchemy.orm import Session

from . import context, emits, packets
from .cluster import ClusterView, cluster_redis_url
from .config import Settings, is_number, load_settings
from .errors import ContextSetupError
from .hooks import install
from .idempotency import create_tables
from .monitor import MonitorNamespace
from .pool import worst_status
from .sessions import SessionFactory, make_source
from .shapes import EventSummary, HealthResult, PoolStatus
from .shutdown import SignalDrain, drain_apps
from .state import AppState, register, worker_id
from .tasks import PeriodicTask, spawn

if TYPE_CHECKING:
    from flask_socketio import SocketIO
    from flask_sqlalchemy import SQLAlchemy

__all__ = ["DBContext"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", None) or repr(func)


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
        register(app, state)
        app.extensions["dbctx"] = self
        try:
            # follow checkouts from the start, when the database is already set up
            state.follow(app)
        except (ContextSetupError, KeyError, RuntimeError):
            logger.debug("database not set up yet; checkouts are followed from first use")
        if socketio is not None:
            emits.install(getattr(socketio, "server", None))
            packets.install(getattr(socketio, "server", None))
            hooks = install(socketio)
            hooks.outside.add(settings.monitor_namespace)
            hooks.wrap_all = hooks.wrap_all or settings.wrap_all_handlers
            hooks.adopt_namespaces()
            if settings.monitor_auth is not None:
                self._start_monitor(app, state, socketio)

    def _start_monitor(self, app: Flask, state: AppState, socketio: SocketIO) -> None:
        settings = state.settings
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
                url,
                worker=worker_id(),
                interval=settings.monitor_interval,
                payload=lambda: state.payload(app),
                push=lambda payload: monitor.push("cluster_status", payload),
                engine=lambda: state.follow(app).get("default"),
                spawn=lambda target: spawn(socketio, target),
                sleep=state.sleep,
            )

    # -- function handlers --------------------------------------------------------------

    def on(
        self, message: str, namespace: str | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a function handler, as ``@socketio.on`` does, that runs
        through the same pipeline as a :class:`~socketio_dbctx.DBContextNamespace`
        handler: fresh app context and session, commit before the ack, error handlers,
        arity check, retries, admission, metrics.

        :param message: the event name (``"*"`` for a catch-all handler).
        :param namespace: the namespace (``"*"`` for every namespace); default ``"/"``.
        :raises ContextSetupError: when this DBContext was made without ``socketio``.
        """

        def decorator(handler: Callable[..., T]) -> Callable[..., T]:
            self.on_event(message, handler, namespace)
            return handler

        return decorator

    def on_event(
        self, message: str, handler: Callable[..., Any], namespace: str | None = None
    ) -> None:
        """The non-decorator form of :meth:`on`, as ``socketio.on_event``.

        :raises ValueError: when ``handler`` is not callable.
        :raises ContextSetupError: when this DBContext was made without ``socketio``.
        """
        if not callable(handler):
            raise ValueError(f"handler must be callable, got {type(handler).__name__}")
        socketio = self.socketio
        if socketio is None:
            raise ContextSetupError(
                "dbctx.on needs the SocketIO instance: create DBContext(app, socketio, db) "
                "(or DBContext(socketio=socketio) before init_app)"
            )
        install(socketio).pipe(handler, message, namespace or "/")
        socketio.on(message, namespace=namespace)(handler)

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Stop the background loops this extension started for the current (or only)
        app: the cluster view leaves the fleet at once. For shutdown and tests.

        :param timeout: seconds to wait for them to end (``None``: don't wait).
        :returns: True when they have ended.
        """
        cluster = self._state(self._app()).cluster
        return cluster.stop(timeout) if cluster is not None else True

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

    def _current(self) -> tuple[Flask, AppState]:
        """The app to act on and its state, with its engines followed."""
        app = self._app()
        state = self._state(app)
        state.follow(app)
        return app, state

    def settings(self, app: Flask | None = None) -> Settings:
        """The validated settings of ``app`` (default: the current or only app)."""
        return self._state(app or self._app()).settings

    # -- scopes and tasks -----------------------------------------------------------

    @staticmethod
    def _scope(app: Flask, state: AppState, label: str) -> Any:
        if state.socketio is not None:
            emits.install(getattr(state.socketio, "server", None))
        return context.session_scope(
            app,
            state.source,
            commit_on_success=state.settings.commit_on_success,
            label=label,
            defer=state.settings.defer_emits,
            failed=state.metrics.after_commit_failed,
            timeout=state.settings.statement_timeout,
        )

    @staticmethod
    def after_commit(callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call ``callback(*args, **kwargs)`` once the current scope (event,
        :meth:`session_scope`, task run) has committed, in order with its held emits.
        Dropped on rollback and with a failed attempt that is retried; outside any
        scope it runs at once. A callback that raises is logged and counted; the
        committed event still acks success."""
        context.after_commit(callback, *args, **kwargs)

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A fresh app context and session: commit on success, roll back on error,
        always removed. Yields the session."""
        app, state = self._current()
        with self._scope(app, state, "scope") as session:
            yield session

    def run_in_context(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``func(*args, **kwargs)`` inside :meth:`session_scope`."""
        with self.session_scope():
            return func(*args, **kwargs)

    def start_background_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Like ``socketio.start_background_task``, but ``func`` runs inside its own
        scope; an exception is logged with its traceback."""
        app, state = self._current()
        label = f"task:{_name(func)}"

        def task() -> None:
            try:
                with self._scope(app, state, label):
                    func(*args, **kwargs)
            except Exception:
                logger.exception("background task %s failed", _name(func))

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
        if not is_number(interval, 0, above=True):
            raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")
        app, state = self._current()
        label = f"periodic:{_name(func)}"

        def run_once() -> None:
            with self._scope(app, state, label):
                func(*args, **kwargs)

        return PeriodicTask(state.socketio, run_once, float(interval), _name(func))

    # -- observation ----------------------------------------------------------------

    def pool_status(self, bind: str | None = None) -> PoolStatus:
        """The pool dict of one bind (``None`` or ``"default"``: the default engine).

        :raises KeyError: for an unknown bind name.
        """
        statuses = self.pool_status_all()
        name = bind or "default"
        if name not in statuses:
            raise KeyError(f"no bind named {name!r}; known binds: {', '.join(statuses)}")
        return statuses[name]

    def pool_status_all(self) -> dict[str, PoolStatus]:
        """``{bind_name: pool dict}``, with ``"default"`` for the default engine."""
        app = self._app()
        return self._state(app).pool_statuses(app)

    def status(self) -> str:
        """The worst status of all pools."""
        return worst_status([p["status"] for p in self.pool_status_all().values()])

    def health_check(self, timeout: float = 2.0) -> HealthResult:
        """Run ``SELECT 1`` on the default engine within ``timeout`` seconds; never raises.

        .. versionchanged:: 0.1
           During a drain: ``{"healthy": False, "error": "draining", ...}``.
        """
        try:
            app, state = self._current()
        except Exception as exc:
            return {"healthy": False, "latency_ms": 0.0, "error": f"{type(exc).__name__}: {exc}"}
        return state.health(app, timeout)

    # -- shutdown -------------------------------------------------------------------

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting events and let the ones in flight finish, commit and ack.

        From the call on, every new event of every app of this extension (and every
        event still waiting for admission) is acked ``busy`` with ``"retryable": true``
        and ``"retry_after_ms"``; connects, disconnects and the monitor keep working.
        :meth:`health_check` says ``{"healthy": False, "error": "draining"}`` and the
        monitor ``status`` is ``draining``. A drain is not undone: it is for shutdown
        (:meth:`drain_on_signals` does the rest).

        :param timeout: seconds to wait for the events in flight; ``None``:
            ``DBCTX_DRAIN_TIMEOUT``.
        :returns: True when none is left, False when ``timeout`` passed first.

        .. versionadded:: 0.1
        """
        return drain_apps(list(self._states.items()), timeout)

    def drain_on_signals(
        self,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
        timeout: float | None = None,
    ) -> SignalDrain:
        """On the first of ``signals``: :meth:`drain` (in a background task of the async
        mode), close every Socket.IO connection, then end the process as the signal
        would (the previous handlers are put back and the signal raised again). A
        second signal stops the process at once. Call it from the main thread, after
        ``socketio.init_app``; under gunicorn, at import of the app module (it then
        replaces the worker's own handlers). See :doc:`/operations`.

        :param timeout: the drain timeout; ``None``: ``DBCTX_DRAIN_TIMEOUT``.
        :raises ContextSetupError: when this DBContext was made without ``socketio``.

        .. versionadded:: 0.1
        """
        if self.socketio is None:
            raise ContextSetupError(
                "drain_on_signals needs the SocketIO instance: create DBContext(app, socketio, db)"
            )
        return SignalDrain(self.drain, self.socketio, signals, timeout).install()

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called (on any app of this extension)."""
        return any(state.draining for state in self._states.values())

    def create_tables(self) -> None:
        """Create the tables socketio_dbctx needs (today the idempotency keys' table,
        :func:`~socketio_dbctx.idempotency_table`) on the default engine, when missing.
        Safe to call at every start, from every worker.

        .. versionadded:: 0.1
        """
        app, state = self._current()
        engine = state.engines(app).get("default")
        if engine is None:
            raise ContextSetupError("create_tables() found no default engine for this app")
        create_tables(engine)

    def metrics(self) -> dict[str, EventSummary]:
        """Per-event counters and latency percentiles, keyed ``"namespace:event"``."""
        return self._state(self._app()).metrics.snapshot()
