"""Function handlers and wrap-all: Flask-SocketIO's ``_handle_event``, hooked per
``SocketIO`` instance.

Every handler Flask-SocketIO runs (``@socketio.on`` functions, ``socketio.on_event``,
plain ``Namespace`` methods) goes through ``SocketIO._handle_event(handler, message,
namespace, sid, *args)``, which pushes the request context and calls the handler. The
hook swaps the handler for one that runs it through the pipeline when it was
registered with ``@dbctx.on`` / ``dbctx.on_event``, or for every handler when
``DBCTX_WRAP_ALL_HANDLERS`` is on (the monitor namespace and the Admin UI's
``/admin`` stay outside). A :class:`~socketio_dbctx.DBContextNamespace` calls the
original directly: it runs the pipeline itself.
"""

from __future__ import annotations

import threading
import weakref
from functools import partial
from typing import Any, Callable

from flask import has_app_context
from flask_socketio import Namespace

from .dispatch import RuntimeCache, run_event

__all__ = ["EventHooks", "install", "original_handle_event"]

_ATTR = "_dbctx_hooks"
_LOCK = threading.Lock()


class EventHooks:
    """The hook of one ``SocketIO`` instance.

    :ivar wrap_all: pipe every handler (``DBCTX_WRAP_ALL_HANDLERS``).
    :ivar outside: namespaces never piped (the monitor's, ``/admin``).
    """

    def __init__(self, socketio: Any) -> None:
        self.original: Callable[..., Any] = socketio._handle_event
        self.wrap_all = False
        self.outside = {"/admin"}
        self._socketio = weakref.ref(socketio)
        # (namespace, event, function) of each @dbctx.on registration: the same
        # function registered elsewhere with @socketio.on stays plain there
        self._piped: set[tuple[str, str, Any]] = set()
        self._runtimes: dict[str, RuntimeCache] = {}

    def pipe(self, handler: Callable[..., Any], message: str, namespace: str) -> None:
        """Run ``handler`` through the pipeline when Flask-SocketIO calls it for
        ``message`` in ``namespace`` (each may be ``"*"``)."""
        self._piped.add((namespace, message, getattr(handler, "__func__", handler)))

    def pipes(self, handler: Callable[..., Any], message: str, namespace: str) -> bool:
        """Whether ``message`` of ``namespace`` handled by ``handler`` goes through the
        pipeline."""
        if self._piped:
            func = getattr(handler, "__func__", handler)
            piped = self._piped
            if (namespace, message, func) in piped or ("*", message, func) in piped:
                return True
        return self.wrap_all and namespace not in self.outside

    def runtimes(self, namespace: str) -> RuntimeCache:
        """The runtimes of the function handlers of ``namespace``."""
        runtimes = self._runtimes.get(namespace)
        if runtimes is None:
            with _LOCK:
                runtimes = self._runtimes.setdefault(namespace, RuntimeCache())
        return runtimes

    def handle_event(
        self, handler: Callable[..., Any], message: str, namespace: str, sid: str, *args: Any
    ) -> Any:
        """Stands in for ``SocketIO._handle_event``."""
        if not self.pipes(handler, message, namespace):
            return self.original(handler, message, namespace, sid, *args)
        socketio = self._socketio()
        runtimes = self.runtimes(namespace)
        fresh = not has_app_context()

        piped = partial(run_event, runtimes, socketio, namespace, message, sid, handler, fresh)
        return self.original(piped, message, namespace, sid, *args)

    def adopt_namespaces(self) -> None:
        """Under wrap-all, give plain ``Namespace`` objects, registered now or later, a
        dispatch without their own ``except Exception: return self.error(exc)``: the
        pipeline calls ``error()`` itself, and that catch would hand it a refusal and
        let a refused client in."""
        socketio = self._socketio()
        if socketio is None or not self.wrap_all or getattr(socketio, "_dbctx_adopts", False):
            return
        server = getattr(socketio, "server", None)
        for handler in [
            *socketio.namespace_handlers,
            *getattr(server, "namespace_handlers", {}).values(),
        ]:
            self._adopt(handler)
        register = socketio.on_namespace

        def on_namespace(namespace_handler: Any) -> Any:
            self._adopt(namespace_handler)
            return register(namespace_handler)

        socketio.on_namespace = on_namespace
        socketio._dbctx_adopts = True

    def _adopt(self, handler: Any) -> None:
        # DBContextNamespace runs its own pipeline; the monitor stays outside
        if type(handler).trigger_event is not Namespace.trigger_event:
            return
        if handler.namespace in self.outside:
            return

        def trigger_event(event: str, *args: Any) -> Any:
            method = getattr(handler, "on_" + (event or ""), None)
            if method is None:
                return None
            return handler.socketio._handle_event(method, event, handler.namespace, *args)

        handler.trigger_event = trigger_event


def install(socketio: Any) -> EventHooks:
    """Hook ``socketio`` (once) and return its hooks."""
    with _LOCK:
        hooks: EventHooks | None = getattr(socketio, _ATTR, None)
        if hooks is None:
            hooks = EventHooks(socketio)
            setattr(socketio, _ATTR, hooks)
            socketio._handle_event = hooks.handle_event
    return hooks


def original_handle_event(socketio: Any) -> Callable[..., Any]:
    """``socketio._handle_event`` as Flask-SocketIO defines it, hooked or not."""
    hooks: EventHooks | None = getattr(socketio, _ATTR, None)
    return hooks.original if hooks is not None else socketio._handle_event
