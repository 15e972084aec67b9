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
from typing import Any, Callable

from flask import has_app_context

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
        self._piped: weakref.WeakSet[Any] = weakref.WeakSet()
        self._runtimes: dict[str, RuntimeCache] = {}

    def pipe(self, handler: Callable[..., Any]) -> None:
        """Run ``handler`` through the pipeline whenever Flask-SocketIO calls it."""
        self._piped.add(getattr(handler, "__func__", handler))

    def pipes(self, handler: Callable[..., Any], namespace: str) -> bool:
        """Whether an event of ``namespace`` handled by ``handler`` goes through the
        pipeline."""
        if getattr(handler, "__func__", handler) in self._piped:
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
        if not self.pipes(handler, namespace):
            return self.original(handler, message, namespace, sid, *args)
        socketio = self._socketio()
        runtimes = self.runtimes(namespace)
        fresh = not has_app_context()

        def piped(*payload: Any) -> Any:
            return run_event(runtimes, socketio, namespace, message, sid, handler, payload, fresh)

        return self.original(piped, message, namespace, sid, *args)


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
