"""Following a scope's transactions through SQLAlchemy's session events.

For the scope running in this thread, greenlet or task (see
:func:`~socketio_dbctx.context.current_scope`), the listeners record:

- that a transaction began (``used``), on which connections, and bound it with the
  scope's statement timeout (:mod:`socketio_dbctx.timeouts`, :mod:`socketio_dbctx.watchdog`);
- that it wrote (a flush, or a statement other than a SELECT);
- the COMMIT: the pending flush first (its statements are not the COMMIT), then, for a
  PostgreSQL transaction that wrote, its transaction id (to resolve a COMMIT whose
  answer is lost, :mod:`socketio_dbctx.outcomes`), then the event's ``commit`` phase;
  the COMMIT waits under the watchdog;
- that it committed: running the event again would apply it twice.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from .context import current_scope
from .outcomes import transaction_id
from .timeouts import bound_transaction
from .watchdog import watch_statements

__all__ = ["follow_commits", "follow_transactions"]


def _on_transaction(session: Session, transaction: Any) -> None:
    scope = current_scope()
    if scope is not None:
        scope.used = True


def _on_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    scope = current_scope()
    if scope is None:
        return
    scope.connections = (*scope.connections, connection)
    if scope.timeout is not None:
        watch = scope.watch
        if watch is not None and connection.dialect.name == "sqlite":
            watch.interrupt, watch.limit = True, scope.timeout
        watch_statements(connection.engine)
        bound_transaction(connection, scope.timeout)


def _on_execute(state: ORMExecuteState) -> None:
    if not state.is_select:
        scope = current_scope()
        if scope is not None and not _is_select_text(state.statement):
            scope.wrote = True


def _is_select_text(statement: Any) -> bool:
    # text("SELECT ...") is not is_select to SQLAlchemy; it reads all the same
    text = getattr(statement, "text", None)
    return isinstance(text, str) and text.lstrip()[:6].upper() == "SELECT"


def _on_flushed(session: Session, flush_context: Any) -> None:
    scope = current_scope()
    if scope is not None:
        scope.unsaved = True
        scope.wrote = True


def _on_commit_start(session: Session) -> None:
    scope = current_scope()
    if scope is None:
        return
    # The flush a commit() would do after this listener: its statements are not the
    # COMMIT, so a failure in them (a lock not granted) must not count as uncertain.
    session.flush()
    scope.txids = ()
    if scope.wrote:
        txids = (
            (connection.engine, transaction_id(connection)) for connection in scope.connections
        )
        scope.txids = tuple((engine, txid) for engine, txid in txids if txid is not None)
    # From here on, losing the connection leaves the outcome unknown.
    if scope.event is not None:
        scope.event.phase = "commit"
    if scope.watch is not None and scope.connections:
        scope.watch.start(scope.connections[0].connection.dbapi_connection)


def _on_committed(session: Session) -> None:
    # Once a COMMIT went through, running the event again would apply it twice.
    scope = current_scope()
    if scope is not None:
        scope.unsaved = False
        if scope.watch is not None:
            scope.watch.stop()
        if scope.event is not None:
            scope.event.committed = True


def _on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        scope = current_scope()
        if scope is not None:
            scope.connections = ()
            scope.wrote = False


def _follow(factory: Any, marker: str, listeners: dict[str, Any]) -> None:
    # ``factory``: a sessionmaker, a scoped_session or a Session subclass. SQLAlchemy
    # attaches the listeners to that maker's own Session subclass, so sessions made
    # elsewhere in the process never run them. Idempotent: the subclass itself is
    # marked, because event.contains() keys on id() and can answer for a collected
    # class whose id a new one reuses.
    maker = getattr(factory, "session_factory", factory)
    cls = maker if isinstance(maker, type) else getattr(maker, "class_", None)
    if cls is not None and cls.__dict__.get(marker):
        return
    for name, listener in listeners.items():
        sa_event.listen(factory, name, listener)
    if cls is not None:
        setattr(cls, marker, True)


def follow_commits(factory: Any) -> None:
    """Follow the commits of the sessions ``factory`` makes: whether a transaction
    began, unsaved writes, the commit phase (see the module's docstring)."""
    _follow(
        factory,
        "_socketio_dbctx_followed",
        {
            "after_transaction_create": _on_transaction,
            "after_flush": _on_flushed,
            "before_commit": _on_commit_start,
            "after_commit": _on_committed,
        },
    )


def follow_transactions(factory: Any) -> None:
    """Also follow their transactions' connections and writes: what statement
    timeouts (on every backend) and lost-COMMIT resolution (on PostgreSQL) need. A
    listener on every ORM statement costs each one a little, so this is added only
    for PostgreSQL engines or once a statement timeout is used."""
    _follow(
        factory,
        "_socketio_dbctx_transactions",
        {
            "after_begin": _on_begin,
            "do_orm_execute": _on_execute,
            "after_transaction_end": _on_transaction_end,
        },
    )
