"""Dispatch: one namespace's runtime in one app, built once, and the run of an event.

A namespace (a :class:`~socketio_dbctx.DBContextNamespace`, or the function handlers
of one namespace) asks its :class:`RuntimeCache` for the runtime of the app an event
runs in; the first event builds it: the settings with the namespace's overrides, its
admission, and the two chains (events, and connect/disconnect without admission).
:func:`run_event` is what every piped handler runs inside Flask-SocketIO's request
context; :func:`find_error_handler` picks the error handler Flask-SocketIO would.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from flask import Flask, current_app, request
from socketio.exceptions import ConnectionRefusedError as SocketIORefused

from . import emits, middleware, packets
from .admission import Admission
from .config import Settings
from .decorators import KeyFunc
from .errors import ContextSetupError
from .pipeline import Event, HandlerSpec, Middleware, Step, Wrap, adapt, build_chain
from .state import AppState, app_state

__all__ = ["LIFECYCLE", "Runtime", "RuntimeCache", "find_error_handler", "run_event", "spec_of"]

logger = logging.getLogger(__name__)

#: Events that skip admission: a full pool must not stop clients connecting or leaving.
LIFECYCLE = frozenset({"connect", "disconnect"})


class Runtime:
    """One namespace's settings, admission and chains in one app."""

    __slots__ = (
        "admission",
        "chain",
        "keyed_chain",
        "lifecycle_chain",
        "settings",
        "sleep",
        "state",
    )

    def __init__(
        self,
        state: AppState,
        settings: Settings,
        admission: Admission,
        extra: Sequence[Middleware],
        find_error: middleware.ErrorHandlerFinder,
        key: KeyFunc | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.state = state
        self.settings = settings
        self.admission = admission
        #: the async mode's sleep (one bound method, not one per event)
        self.sleep = sleep
        inner: tuple[Wrap, ...] = (
            middleware.metrics,
            middleware.retry,
            middleware.transaction,
        )
        user = tuple(adapt(mw) for mw in extra)
        errors = middleware.errors(find_error)
        outer = (errors, middleware.admission(admission), *inner)
        #: for handlers without options in a namespace without a key: no key to look for
        self.chain: Step = build_chain((*outer, *user))
        #: for the others (a handler's options may name a key)
        self.keyed_chain: Step = build_chain((*outer, middleware.idempotency(key), *user))
        if key is not None:
            self.chain = self.keyed_chain
        self.lifecycle_chain: Step = build_chain((errors, *inner, *user))


class RuntimeCache:
    """The runtimes of one namespace, by app (weakly: an app that goes away frees its).

    :param overrides: the namespace's setting overrides (``None``: the app's value).
    :param extra: user middleware, innermost.
    :param key: the namespace's idempotency key function, for handlers without one.
    """

    # First events of many clients at once must not build two runtimes (two admissions).
    _LOCK = threading.RLock()

    def __init__(
        self,
        overrides: Mapping[str, Any] | None = None,
        extra: Sequence[Middleware] = (),
        key: KeyFunc | None = None,
    ) -> None:
        self.overrides = dict(overrides or {})
        self.extra = tuple(extra)
        self.key = key
        self._runtimes: weakref.WeakKeyDictionary[Flask, Runtime] = weakref.WeakKeyDictionary()
        #: the last app (a weak reference) and its runtime: a WeakKeyDictionary lookup
        #: makes a weakref each time
        self.last: tuple[Callable[[], Any], Runtime | None] = (lambda: None, None)

    def get(self, app: Flask, socketio: Any) -> Runtime:
        """The runtime of ``app``, built by the first event."""
        last_app, runtime = self.last
        if runtime is not None and last_app() is app:
            return runtime
        runtime = self._runtimes.get(app)
        if runtime is None:
            with self._LOCK:
                runtime = self._runtimes.get(app)
                if runtime is None:
                    runtime = self._runtimes[app] = self._build(app, socketio)
        self.last = (weakref.ref(app), runtime)
        return runtime

    def _build(self, app: Flask, socketio: Any) -> Runtime:
        state = app_state(app, socketio)
        emits.install(socketio.server)
        packets.install(socketio.server)
        async_mode = socketio.server.async_mode
        state.check_drivers(app, async_mode)
        settings = state.settings.override(self.overrides)
        admission = Admission(
            state.process_limit(app, async_mode),
            settings.max_in_flight_per_client,
            settings.queue_timeout,
        )
        return Runtime(
            state,
            settings,
            admission,
            self.extra,
            lambda event: find_error_handler(socketio, event),
            self.key,
            socketio.sleep,
        )


def find_error_handler(socketio: Any, event: Event) -> Callable[[Exception], Any] | None:
    """The error handler for a failed event, in Flask-SocketIO's documented order: the
    namespace object's own ``error(exc)``, else ``@socketio.on_error(namespace)``, else
    ``@socketio.on_error_default``; ``None`` when there is none. Looked up at failure
    time, so handlers registered late count."""
    owner = getattr(event.handler, "__self__", None)
    own = getattr(owner, "error", None) if owner is not None else None
    if callable(own):
        return own  # type: ignore[no-any-return]
    handlers = getattr(socketio, "exception_handlers", None) or {}
    found = handlers.get(event.namespace, getattr(socketio, "default_exception_handler", None))
    return found


_SPECS: dict[Any, HandlerSpec] = {}


def spec_of(handler: Callable[..., Any]) -> HandlerSpec:
    """What we know of ``handler`` (a function or a bound method), worked out once."""
    key = getattr(handler, "__func__", handler)
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = HandlerSpec(handler)
    return spec


def run_event(
    runtimes: RuntimeCache,
    socketio: Any,
    namespace: str,
    name: str,
    sid: str | None,
    handler: Callable[..., Any],
    fresh: bool,
    *payload: Any,
) -> Any:
    """Run one event through its namespace's pipeline; return the ack.

    Bound with ``functools.partial`` to everything but ``payload``, it is the handler
    Flask-SocketIO calls (a partial adds no Python frame).

    Called inside Flask-SocketIO's request context for the event (``request.sid``,
    ``request.namespace`` and ``request.event`` are set).

    :param fresh: no app context was active before Flask-SocketIO pushed this event's,
        so that one is new and the event's alone.
    """
    try:
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        last_app, runtime = runtimes.last  # runtimes.get(app, socketio), its fast path
        if runtime is None or last_app() is not app:
            runtime = runtimes.get(app, socketio)
        spec = _SPECS.get(getattr(handler, "__func__", handler)) or spec_of(handler)
        if name in LIFECYCLE and payload and not spec.accepts(len(payload)):
            # connect gets (auth,), disconnect (reason,): pass them only when accepted
            payload = ()
            if name == "disconnect":  # as python-socketio's call of a legacy handler
                request.event["args"] = ()  # type: ignore[attr-defined]
        event = Event(
            app,
            runtime.state,
            runtime.settings,
            namespace,
            name,
            sid,
            payload,
            handler,
            spec,
            runtime.sleep,
            fresh,
        )
        if name in LIFECYCLE:
            return runtime.lifecycle_chain(event)
        return (runtime.keyed_chain if spec.options else runtime.chain)(event)
    except SocketIORefused:
        raise
    except ConnectionRefusedError as exc:
        # Flask-SocketIO lets only socketio's own class past its error handlers
        # (on_error_default would accept the client): convert the built-in one, with
        # python-socketio's own words for it (its text is not for the client).
        raise SocketIORefused("Connection refused by server") from exc
    except ContextSetupError:
        if name != "connect":
            raise
        logger.exception("connection to %s refused: setup error", namespace)
        raise SocketIORefused("internal_error") from None
