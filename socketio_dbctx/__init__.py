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

from .config import NamespaceSettings
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
from .shapes import (
    ClusterPayload,
    ErrorAck,
    EventSummary,
    FleetTotals,
    HealthResult,
    LeakEntry,
    MonitorPayload,
    PoolStatus,
)
from .tasks import PeriodicTask
from .transient import is_transient

__version__ = "0.1.0"

__all__ = [
    "BusyError",
    "ClusterPayload",
    "ContextSetupError",
    "DBContext",
    "DBContextNamespace",
    "DatabaseUnavailableError",
    "ErrorAck",
    "Event",
    "EventSummary",
    "FleetTotals",
    "HealthResult",
    "InvalidRequestError",
    "LeakEntry",
    "MonitorNamespace",
    "MonitorPayload",
    "NamespaceSettings",
    "PeriodicTask",
    "PoolStatus",
    "RetryExhaustedError",
    "WebSocketContextError",
    "WebSocketContextHelper",
    "__version__",
    "idempotent",
    "is_transient",
    "no_retry",
    "retry_policy",
]
