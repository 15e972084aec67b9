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
from typing import TYPE_CHECKING

from flask import Flask
from sqlalchemy.orm import Session

from .errors import ContextSetupError

if TYPE_CHECKING:
    from .pipeline import Event
    from .sessions import SessionSource

__all__ = ["Scope", "async_scope", "commit", "current_scope", "open_scope", "session_scope"]

logger = logging.getLogger("socketio_dbctx")


class Scope:
    """What a running scope knows: its session and, for Socket.IO events, the event."""

    __slots__ = ("event", "label", "session")

    def __init__(self, session: Session, event: Event | None, label: str | None) -> None:
        self.session = session
        self.event = event
        self.label = label


_current: ContextVar[Scope | None] = ContextVar("socketio_dbctx_scope", default=None)


def current_scope() -> Scope | None:
    """The innermost scope running in this thread, greenlet or task, if any."""
    return _current.get()


def require_session() -> Session:
    """The current scope's session.

    :raises ContextSetupError: outside an event handler or a scope.
    """
    scope = _current.get()
    if scope is None:
        raise ContextSetupError(
            "no socketio_dbctx scope is active: use self.session inside an event handler "
            "of a DBContextNamespace, or open one with dbctx.session_scope()"
        )
    return scope.session


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except Exception:  # the connection may be gone; closing the session still frees it
        logger.debug("rollback failed", exc_info=True)


@contextmanager
def open_scope(
    app: Flask, source: SessionSource, *, event: Event | None = None, label: str | None = None
) -> Iterator[Scope]:
    """Push a fresh app context, open a session, and undo both on the way out.

    The session is rolled back when the block raises, and is always closed and
    removed; nothing is committed here (see :func:`commit`).
    """
    ctx = app.app_context()
    ctx.push()
    try:
        session, token = source.open()
        scope = Scope(session, event, label)
        var_token = _current.set(scope)
        try:
            yield scope
        except BaseException:
            _rollback(session)
            raise
        finally:
            _current.reset(var_token)
            source.close(session, token)
    finally:
        ctx.pop()


def commit(scope: Scope) -> None:
    """Flush, then commit the scope's session.

    Flushing first makes statement errors (constraint violations, serialization
    failures) happen before the COMMIT round trip, so a failure during the COMMIT
    itself is known to be one whose outcome is uncertain.
    """
    session = scope.session
    if session.in_transaction():
        session.flush()
        if scope.event is not None:
            scope.event.phase = "commit"
        session.commit()


@contextmanager
def session_scope(
    app: Flask, source: SessionSource, *, commit_on_success: bool = True, label: str = "scope"
) -> Iterator[Session]:
    """Sync scope for code outside Socket.IO events; yields the session.

    :param label: names the scope in leak reports (e.g. ``"task:refresh_prices"``).
    """
    with open_scope(app, source, label=label) as scope:
        yield scope.session
        if commit_on_success:
            commit(scope)


@asynccontextmanager
async def async_scope(
    app: Flask, source: SessionSource, *, commit_on_success: bool = True
) -> AsyncIterator[Session]:
    """Async scope for asyncio code; the app context is local to the running task."""
    with open_scope(app, source, label="async") as scope:
        yield scope.session
        if commit_on_success:
            commit(scope)
