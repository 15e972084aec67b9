"""The per-event scope: a fresh app context and a fresh session, always cleaned up.

A scope never reuses an outer app context, so the session is new even when the
caller sits inside ``with app.app_context():`` (the usual cause of pool
exhaustion in long-lived Socket.IO servers).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable

from flask import Flask
from sqlalchemy.orm import Session

from .errors import ContextSetupError
from .watchdog import WATCHDOG, Watch, current_scope_var

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.engine import Connection, Engine

    from .pipeline import Event
    from .sessions import SessionSource

__all__ = [
    "Scope",
    "ScopeState",
    "after_commit",
    "async_scope",
    "commit",
    "current_scope",
    "open_scope",
    "release",
    "session_scope",
]

logger = logging.getLogger(__name__)


class ScopeState:
    """What a running scope knows, whatever made it (a Flask scope here, an asyncio one
    in :mod:`socketio_dbctx.aio`): for Socket.IO events the event, the sends held until
    it commits, and its transactions as :mod:`socketio_dbctx.transactions` follows them.

    :ivar defer: emits in this scope are held until it ends successfully.
    """

    __slots__ = (
        "_var_token",
        "connections",
        "defer",
        "event",
        "held",
        "label",
        "timeout",
        "txids",
        "unsaved",
        "used",
        "watch",
        "wrote",
    )

    def __init__(
        self,
        event: Event | None = None,
        label: str | None = None,
        defer: bool = False,
        timeout: float | None = None,
    ) -> None:
        # positional: a scope is made per event, and keywords cost more
        self.event = event
        self.label = label
        self.defer = defer
        self.held: list[Callable[[], Any]] | None = None
        #: a flush wrote rows that no COMMIT has saved yet
        self.unsaved = False
        #: a session of ours began a transaction in this scope (so there may be
        #: something to commit); a scope that never touched the database skips it
        self.used = False
        #: the statement timeout of this scope's transactions, if bounded
        self.timeout = timeout
        #: the watchdog's view of this scope's waits, while bounded
        self.watch: Watch | None = None
        #: a flush or a statement other than a SELECT ran in the current transaction
        self.wrote = False
        #: the connections of the current transaction (a new tuple per change: rare,
        #: and no list to allocate for the many scopes that never use one)
        self.connections: tuple[Connection, ...] = ()
        #: (engine, transaction id) of each connection that wrote, asked before COMMIT
        self.txids: tuple[tuple[Engine, int], ...] = ()

    def _activate(self) -> None:
        """Make this the current scope; a bounded one's watch goes to the watchdog."""
        self._var_token = _current.set(self)
        if self.timeout is not None:
            self.watch = Watch(self.timeout)
            WATCHDOG.register(self.watch)

    def _deactivate(self) -> None:
        _current.reset(self._var_token)
        if self.watch is not None:
            WATCHDOG.unregister(self.watch)

    def hold(self, send: Callable[[], Any]) -> None:
        """Keep ``send`` until the scope has committed; dropped if it fails."""
        if self.held is None:
            self.held = [send]
        else:
            self.held.append(send)

    def take_held(self) -> list[Callable[[], Any]] | None:
        """The held sends, in call order, now owned by the caller; none when the scope
        ends with writes that were never committed (``commit_on_success=False`` and no
        COMMIT of the handler's own): closing the session rolls those back."""
        held, self.held = self.held, None
        if held and self._uncommitted():
            logger.info(
                "dropped %d held send(s): the scope's writes were not committed", len(held)
            )
            return None
        return held

    def _uncommitted(self) -> bool:
        session = self.active_session()
        if session is None:
            return False
        return self.unsaved or bool(session.new or session.dirty or session.deleted)

    @property
    def session(self) -> Any:
        """The scope's session, created on first use."""
        raise NotImplementedError

    def active_session(self) -> Any:
        """The scope's session if anything created it, else None."""
        raise NotImplementedError


class Scope(ScopeState):
    """A fresh app context and a scope in it, undone on the way out; its session is
    made on first use.

    ``with Scope(app, source, event=..., label=...) as scope:`` (also spelled
    :data:`open_scope`). The session (if one was made) is rolled back when the block
    raises, and is always closed and removed; nothing is committed here (see
    :func:`commit`). A class rather than a generator, and one object rather than two:
    it runs once per event.

    :param fresh_context: the active app context was made for this scope alone (by
        Flask-SocketIO for this event), so it is already fresh and need not be doubled.
    """

    __slots__ = ("_ctx", "source", "token")

    def __init__(
        self,
        app: Flask,
        source: SessionSource,
        event: Event | None = None,
        label: str | None = None,
        fresh_context: bool = False,
        defer: bool = False,
        timeout: float | None = None,
    ) -> None:
        ScopeState.__init__(self, event, label, defer, timeout)
        self._ctx = None if fresh_context else app.app_context()
        self.source = source
        self.token: Any = None

    def __enter__(self) -> Scope:
        ctx = self._ctx
        if ctx is not None:
            ctx.push()
        try:
            if self.timeout is not None:  # bounded: its transactions must be followed
                self.source.follow_transactions()
            self.token = self.source.open()
        except BaseException:
            if ctx is not None:
                ctx.pop()
            raise
        self._activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            try:
                if exc_type is not None:
                    session = self.active_session()
                    if session is not None:
                        _rollback(session)
            finally:
                self._deactivate()
                self.source.close(self.token, self.used)
        finally:
            if self._ctx is not None:
                self._ctx.pop()

    @property
    def session(self) -> Session:
        """The scope's session, created on first use."""
        return self.source.get(self.token)

    def active_session(self) -> Session | None:
        """The scope's session if anything created it, else None."""
        return self.source.active(self.token)


_current: ContextVar[ScopeState | None] = current_scope_var


def current_scope() -> ScopeState | None:
    """The innermost scope running in this thread, greenlet or task, if any."""
    return _current.get()


def require_session() -> Session:
    """The current scope's session.

    :raises ContextSetupError: outside an event handler or a scope.
    """
    scope = _current.get()
    if scope is None:
        raise ContextSetupError(
            "no socketio_dbctx scope is active: use self.db_session inside an event handler "
            "of a DBContextNamespace, or open one with dbctx.session_scope()"
        )
    return scope.session  # type: ignore[no-any-return]


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except Exception:  # the connection may be gone; closing the session still frees it
        logger.debug("rollback failed", exc_info=True)


#: ``with open_scope(app, source, event=..., label=...) as scope:`` pushes a fresh app
#: context and opens a :class:`Scope` (one object: this runs once per event).
open_scope = Scope


def commit(scope: Scope) -> None:
    """Commit the scope's session.

    Its ``before_commit`` listener (:mod:`socketio_dbctx.transactions`) flushes first,
    so statement errors (constraint violations, serialization failures) happen before
    the COMMIT round trip and a failure during the COMMIT itself is known to be one
    whose outcome is uncertain; then it marks the commit phase.
    """
    if not scope.used:  # no transaction ever began: nothing to commit, no session to ask
        return
    session = scope.active_session()
    if session is not None and session.in_transaction():
        session.commit()


def release(held: list[Callable[[], Any]] | None, failed: Callable[[], Any] | None) -> None:
    """Run the sends a scope held, in call order, after it committed and closed.

    One that fails is logged and counted (``failed()``), never raised: the event has
    committed, and its ack must say so. The rest still run.
    """
    if not held:
        return
    for send in held:
        try:
            send()
        except Exception:
            logger.exception("a send or callback held until the commit failed")
            if failed is not None:
                failed()


def after_commit(callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``callback(*args, **kwargs)`` once the current scope has committed, in
    order with its held emits; dropped if the scope fails. Outside a scope it runs at
    once."""
    scope = _current.get()
    if scope is None:
        callback(*args, **kwargs)
    else:
        scope.hold(lambda: callback(*args, **kwargs))


@contextmanager
def session_scope(
    app: Flask,
    source: SessionSource,
    *,
    commit_on_success: bool = True,
    label: str = "scope",
    defer: bool = True,
    failed: Callable[[], Any] | None = None,
    timeout: float | None = None,
) -> Iterator[Session]:
    """Sync scope for code outside Socket.IO events; yields the session.

    :param label: names the scope in leak reports (e.g. ``"task:refresh_prices"``).
    :param defer: hold emits until the scope has committed.
    :param failed: counts a held send that failed after the commit.
    :param timeout: the statement timeout of the scope's transactions.
    """
    with open_scope(app, source, label=label, defer=defer, timeout=timeout) as scope:
        yield scope.session
        if commit_on_success:
            commit(scope)
        held = scope.take_held()
    release(held, failed)


@asynccontextmanager
async def async_scope(
    app: Flask, source: SessionSource, *, commit_on_success: bool = True
) -> AsyncIterator[Session]:
    """Async scope for asyncio code; the app context is local to the running task."""
    with open_scope(app, source, label="async") as scope:
        yield scope.session
        if commit_on_success:
            commit(scope)
