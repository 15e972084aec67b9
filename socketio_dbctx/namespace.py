"""``DBContextNamespace``: every event in its own app context and session."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from flask import has_app_context
from flask_socketio import Namespace
from sqlalchemy.orm import Session

from .config import NamespaceSettings
from .context import require_session
from .decorators import KeyFunc
from .dispatch import RuntimeCache, run_event
from .hooks import original_handle_event
from .pipeline import Middleware

__all__ = ["DBContextNamespace"]


class DBContextNamespace(NamespaceSettings, Namespace):  # type: ignore[misc]
    """A Flask-SocketIO ``Namespace`` whose handlers each run in a fresh app context
    with a fresh session, committed on success and rolled back on error.

    Class attributes named after settings (``max_retries = 0``, see
    :class:`~socketio_dbctx.NamespaceSettings`) override the app's configuration for
    this namespace; ``None`` keeps the app's value. ``idempotency_key`` gives every
    event of the namespace an idempotency key (see
    :func:`~socketio_dbctx.idempotency_key`). ``extra_middleware`` is a sequence
    of ``mw(event, call_next)`` callables run innermost, just around the handler,
    inside the event's context. Everything a plain ``Namespace`` offers works as there,
    python-socketio's per-client ``self.session(sid)`` included.
    """

    extra_middleware: Sequence[Middleware] = ()
    #: A function of the payload giving the client's idempotency key, for the events
    #: of this namespace whose handler has no ``@idempotency_key`` of its own.
    idempotency_key: KeyFunc | None = None

    def __init__(self, namespace: str | None = None) -> None:
        super().__init__(namespace)
        self._dbctx_runtimes: RuntimeCache | None = None
        self._dbctx_handle: Any = None  # Flask-SocketIO's own _handle_event, once known

    @property
    def db_session(self) -> Session:
        """The current event's SQLAlchemy session (the same one as ``db.session``)."""
        return require_session()

    def trigger_event(self, event: str, *args: Any) -> Any:
        """Run ``on_<event>`` through the per-event pipeline; return the ack."""
        handler = getattr(self, "on_" + (event or ""), None)
        if handler is None:
            return None
        runtimes = self._dbctx_runtimes
        if runtimes is None:
            # read from the class: a function stored there must not become a method
            key = getattr(type(self), "idempotency_key", None)
            runtimes = self._dbctx_runtimes = RuntimeCache(
                self.setting_overrides(), self.extra_middleware, key
            )
        socketio, namespace = self.socketio, self.namespace
        # With no app context active now, the one Flask-SocketIO pushes for this event
        # is new and ours alone; with an outer one active, it would be reused.
        fresh = not has_app_context()
        sid = args[0] if args else None  # python-socketio passes the sid first

        wrapped = partial(run_event, runtimes, socketio, namespace, event, sid, handler, fresh)
        handle = self._dbctx_handle
        if handle is None:
            handle = self._dbctx_handle = original_handle_event(socketio)
        return handle(wrapped, event, namespace, *args)
