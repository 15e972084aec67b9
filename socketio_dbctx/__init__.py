"""socketio_dbctx: a fresh Flask app context and SQLAlchemy session for every
Flask-SocketIO event, so long-lived WebSocket connections never exhaust the pool.

Usage::

    dbctx = DBContext(app, socketio, db)

    class Chat(DBContextNamespace):
        def on_send(self, data):
            db.session.add(Message(text=data["text"]))
            return {"ok": True}          # committed before the ack

    socketio.on_namespace(Chat("/chat"))

The modules form layers; each imports only from its own layer or those below it
(``tests/test_architecture.py`` keeps this drawing true)::

    facade      extension  helper  prometheus  shutdown  aio
                    |         (the Flask extension, the asyncio helper, metrics export,
                    |          drain on signals; the asyncio stack, a package)
    dispatch    namespace  monitor  hooks  dispatch  packets
                    |         (namespaces, function handlers; runtimes and the event run;
                    |          malformed packets)
    pipeline    middleware  pipeline  keyed  settle
                    |         (the Event, the chain built once, the built-in steps)
    state       state
                    |         (one app's settings, source, metrics, tracker; the registry)
    scopes      context  sessions  emits  transactions
                    |         (a fresh app context and session per scope; held emits;
                    |          following its transactions: writes, COMMIT, timeouts)
    mechanisms  acks  admission  cluster  drivers  health  idempotency  leaks  metrics
                outcomes  pool  retry  tasks  timeouts  watchdog
                    |         (one concern each, no Flask-SocketIO dispatch knowledge)
    base        config  decorators  errors  shapes  throttle  transient
                              (settings, exceptions, public shapes, pure classification)
"""

from __future__ import annotations

from .config import NamespaceSettings
from .decorators import (
    idempotency_key,
    idempotent,
    no_retry,
    retry_policy,
    statement_timeout,
)
from .emits import immediate_emits
from .errors import (
    BusyError,
    ContextSetupError,
    DatabaseUnavailableError,
    InvalidRequestError,
    OutcomeUnknownError,
    RetryExhaustedError,
    StatementTimeoutError,
    WebSocketContextError,
)
from .extension import DBContext
from .helper import WebSocketContextHelper
from .idempotency import idempotency_table
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
    "OutcomeUnknownError",
    "PeriodicTask",
    "PoolStatus",
    "RetryExhaustedError",
    "StatementTimeoutError",
    "WebSocketContextError",
    "WebSocketContextHelper",
    "__version__",
    "idempotency_key",
    "idempotency_table",
    "idempotent",
    "immediate_emits",
    "is_transient",
    "no_retry",
    "retry_policy",
    "statement_timeout",
]
