"""socketio_dbctx: a fresh Flask app context and SQLAlchemy session for every
Flask-SocketIO event, so long-lived WebSocket connections never exhaust the pool.

Usage::

    dbctx = DBContext(app, socketio, db)

    class Chat(DBContextNamespace):
        def on_send(self, data):
            db.session.add(Message(text=data["text"]))
            return {"ok": True}          # committed before the ack

    socketio.on_namespace(Chat("/chat"))
"""

from __future__ import annotations

from .decorators import idempotent, no_retry, retry_policy
from .errors import (
    BusyError,
    ContextSetupError,
    DatabaseUnavailableError,
    InvalidRequestError,
    RetryExhaustedError,
    WebSocketContextError,
)
from .extension import DBContext
from .helper import WebSocketContextHelper
from .monitor import MonitorNamespace
from .namespace import DBContextNamespace
from .pipeline import Event
from .tasks import PeriodicTask
from .transient import is_transient

__version__ = "0.1.0"

__all__ = [
    "BusyError",
    "ContextSetupError",
    "DBContext",
    "DBContextNamespace",
    "DatabaseUnavailableError",
    "Event",
    "InvalidRequestError",
    "MonitorNamespace",
    "PeriodicTask",
    "RetryExhaustedError",
    "WebSocketContextError",
    "WebSocketContextHelper",
    "__version__",
    "idempotent",
    "is_transient",
    "no_retry",
    "retry_policy",
]
