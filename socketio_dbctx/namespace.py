"""``DBContextNamespace``: every event in its own app context and session."""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Callable

from flask import Flask, current_app, has_app_context, request
from flask_socketio import Namespace
from socketio.exceptions import ConnectionRefusedError as SocketIORefused
from sqlalchemy.orm import Session

from .acks import error_payload, log_failure
from .admission import Admission
from .config import Settings
from .context import commit, open_scope, require_session
from .decorators import handler_options
from .drivers import check_green_driver, enforce_connect_timeout
from .errors import ContextSetupError, InvalidRequestError
from .extension import AppState, app_state
from .pipeline import Event, Middleware, metrics_middleware, run_chain, transaction_middleware
from .retry import retry_middleware

__all__ = ["NAMESPACE_SETTINGS", "DBContextNamespace"]

logger = logging.getLogger("socketio_dbctx")

#: Settings a namespace may override with a class attribute (``None``: the app's).
NAMESPACE_SETTINGS = (
    "commit_on_success",
    "expose_errors",
    "max_in_flight_per_client",
    "max_retries",
    "queue_timeout",
    "retry_delay",
    "retry_max_delay",
)

_BUILTIN: tuple[Middleware, ...] = (metrics_middleware, retry_middleware, transaction_middleware)
# Never held back by admission: a full pool must not stop clients from connecting.
_LIFECYCLE = ("connect", "disconnect")
# First events of many clients at once must not build two runtimes (two admissions).
_RUNTIME_LOCK = threading.RLock()


class _Handler:
    """What we know of one ``on_<event>`` method, worked out once."""

    __slots__ = ("max_args", "min_args", "options")

    def __init__(self, method: Callable[..., Any]) -> None:
        self.options = handler_options(method)
        self.min_args = 0
        self.max_args: float = 0
        for param in inspect.signature(method).parameters.values():
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                self.max_args += 1
                if param.default is param.empty:
                    self.min_args += 1
            elif param.kind is param.VAR_POSITIONAL:
                self.max_args = float("inf")
            elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
                self.min_args = -1  # cannot be called with client arguments at all

    def accepts(self, count: int) -> bool:
        return self.min_args != -1 and self.min_args <= count <= self.max_args

    def __call__(self, event: Event) -> Any:
        """The end of the chain: check the arity, then call the handler."""
        if not self.accepts(len(event.args)):
            raise InvalidRequestError(
                f"{event.name} takes {self.describe_arity()} argument(s), got {len(event.args)}"
            )
        return event.handler(*event.args)

    def describe_arity(self) -> str:
        if self.min_args == -1:
            return "no client"
        if self.max_args == self.min_args:
            return str(self.min_args)
        if self.max_args == float("inf"):
            return f"at least {self.min_args}"
        return f"{self.min_args} to {int(self.max_args)}"


class _Runtime:
    """One namespace's settings and middleware chains in one app."""

    __slots__ = ("admission", "chain", "lifecycle_chain", "settings", "state")

    def __init__(
        self,
        state: AppState,
        settings: Settings,
        admission: Admission,
        extra: Sequence[Middleware],
    ) -> None:
        self.state = state
        self.settings = settings
        self.admission = admission
        self.lifecycle_chain = (*_BUILTIN, *extra)
        self.chain = (admission.middleware, *self.lifecycle_chain)


class DBContextNamespace(Namespace):  # type: ignore[misc]
    """A Flask-SocketIO ``Namespace`` whose handlers each run in a fresh app context
    with a fresh session, committed on success and rolled back on error.

    Class attributes named after settings (``max_retries = 0``) override the app's
    configuration for this namespace; ``None`` keeps the app's value.
    ``extra_middleware`` is a sequence of ``mw(event, call_next)`` callables run
    innermost, just around the handler, inside the event's context.
    """

    commit_on_success: bool | None = None
    expose_errors: bool | None = None
    max_in_flight_per_client: int | None = None
    max_retries: int | None = None
    queue_timeout: float | None = None
    retry_delay: float | None = None
    retry_max_delay: float | None = None
    extra_middleware: Sequence[Middleware] = ()

    def __init__(self, namespace: str | None = None) -> None:
        super().__init__(namespace)
        self._dbctx_runtimes: weakref.WeakKeyDictionary[Flask, _Runtime] = (
            weakref.WeakKeyDictionary()
        )
        self._dbctx_handlers: dict[str, _Handler] = {}

    @property
    def session(self) -> Session:
        """The current event's session (the same one as ``db.session`` in the handler)."""
        return require_session()

    # -- dispatch -----------------------------------------------------------------------

    def trigger_event(self, event: str, *args: Any) -> Any:
        """Run ``on_<event>`` through the per-event pipeline; return the ack."""
        handler = getattr(self, "on_" + (event or ""), None)
        if handler is None:
            return None

        # With no app context active now, the one Flask-SocketIO pushes for this event
        # is new and ours alone; with an outer one active, it would be reused.
        fresh = not has_app_context()

        def wrapped(*payload: Any) -> Any:
            try:
                return self._dbctx_dispatch(event, handler, payload, fresh)
            except SocketIORefused:
                raise
            except ConnectionRefusedError as exc:
                # Flask-SocketIO lets only socketio's own class past its error handlers
                # (on_error_default would accept the client): convert the built-in one.
                raise SocketIORefused(*exc.args) from exc
            except ContextSetupError:
                if event != "connect":
                    raise
                logger.exception("connection to %s refused: setup error", self.namespace)
                raise SocketIORefused("internal_error") from None

        return self.socketio._handle_event(wrapped, event, self.namespace, *args)

    def _dbctx_runtime(self, app: Flask) -> _Runtime:
        runtime = self._dbctx_runtimes.get(app)
        if runtime is None:
            with _RUNTIME_LOCK:
                runtime = self._dbctx_runtimes.get(app) or self._dbctx_new_runtime(app)
        return runtime

    def _dbctx_new_runtime(self, app: Flask) -> _Runtime:
        state = app_state(app, self.socketio)
        state.track(app)
        async_mode = self.socketio.server.async_mode
        if not state.drivers_checked:
            state.drivers_checked = True
            engines = state.engines(app)
            check_green_driver(engines, async_mode)
            for engine in engines.values():  # the server may not have existed at init_app
                enforce_connect_timeout(engine, async_mode)
        overrides = {name: getattr(self, name) for name in NAMESPACE_SETTINGS}
        settings = state.settings.override(overrides)
        process = state.process_limit(app, async_mode)
        admission = Admission(process, settings.max_in_flight_per_client, settings.queue_timeout)
        runtime = _Runtime(state, settings, admission, self.extra_middleware)
        self._dbctx_runtimes[app] = runtime
        return runtime

    def _dbctx_handler(self, event: str, handler: Callable[..., Any]) -> _Handler:
        info = self._dbctx_handlers.get(event)
        if info is None:
            info = self._dbctx_handlers[event] = _Handler(handler)
        return info

    def _dbctx_dispatch(
        self, name: str, handler: Callable[..., Any], payload: tuple[Any, ...], fresh: bool
    ) -> Any:
        # Runs inside Flask-SocketIO's request context: request.sid is set.
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        runtime = self._dbctx_runtime(app)
        info = self._dbctx_handler(name, handler)
        if name in _LIFECYCLE:
            # connect gets (auth,), disconnect (reason,): pass them only when accepted
            payload = payload if payload and info.accepts(len(payload)) else ()
        event = Event(
            app=app,
            state=runtime.state,
            settings=runtime.settings,
            namespace=self.namespace,
            name=name,
            sid=getattr(request, "sid", None),
            args=payload,
            handler=handler,
            options=info.options,
            sleep=self.socketio.sleep,
            fresh_context=fresh,
        )
        try:
            chain = runtime.lifecycle_chain if name in _LIFECYCLE else runtime.chain
            result = run_chain(chain, event, info)
        except (ConnectionRefusedError, SocketIORefused):
            if name == "connect":
                logger.info("connection to %s refused for sid %s", self.namespace, event.sid)
            raise
        except ContextSetupError:
            raise
        except Exception as exc:
            return self._dbctx_failed(event, exc)
        if name == "connect" and result is False:
            logger.info("connection to %s refused for sid %s", self.namespace, event.sid)
        return result

    def _dbctx_failed(self, event: Event, exc: Exception) -> Any:
        """Answer a failed event: ``error()`` when the subclass has one, else a payload."""
        ack = None
        custom = getattr(self, "error", None)
        if custom is not None:
            try:
                with open_scope(
                    event.app, event.state.source, event=event, label=event.key
                ) as scope:
                    ack = custom(exc)
                    commit(scope)
            except (ConnectionRefusedError, SocketIORefused):
                if event.name == "connect":
                    raise
                logger.exception("%s.error() raised while handling %s", type(self).__name__, exc)
                custom = None
            except Exception:
                logger.exception("%s.error() raised while handling %s", type(self).__name__, exc)
                custom = None
        if custom is None:
            log_failure(event.key, event.sid, exc)
            ack = error_payload(exc, expose=event.settings.expose_errors)
        if event.name == "connect":
            # A connect handler that crashed must not let the client in.
            payload = error_payload(exc, expose=event.settings.expose_errors)
            raise SocketIORefused(payload["error"], payload)
        return None if event.name == "disconnect" else ack
