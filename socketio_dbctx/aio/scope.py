"""The asyncio scope: a fresh ``AsyncSession`` per event or block, always closed.

The same :class:`~socketio_dbctx.context.ScopeState` as the Flask scope, so the session
listeners of :mod:`socketio_dbctx.transactions` (commit phase, writes, transaction ids,
statement timeouts) and held emits work unchanged: SQLAlchemy runs an ``AsyncSession``'s
work in a greenlet that sees the task's context variables. The session belongs to the
running task alone (context variables are per task), so no two tasks ever share one.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, Callable

from ..context import ScopeState
from ..transactions import follow_transactions

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from ..pipeline import Event

__all__ = ["AsyncScope", "commit", "release"]

logger = logging.getLogger(__name__)


class AsyncScope(ScopeState):
    """``async with AsyncScope(maker, event=..., label=...) as scope:``: the session
    (made on first use of :attr:`session`) is rolled back when the block raises and is
    always closed; nothing is committed here (see :func:`commit`).

    :param maker: the ``async_sessionmaker`` sessions come from.
    """

    __slots__ = ("_maker", "_session")

    def __init__(
        self,
        maker: async_sessionmaker[Any],
        *,
        event: Event | None = None,
        label: str | None = None,
        defer: bool = False,
        timeout: float | None = None,
    ) -> None:
        super().__init__(event=event, label=label, defer=defer, timeout=timeout)
        self._maker = maker
        self._session: AsyncSession | None = None

    async def __aenter__(self) -> AsyncScope:
        if self.timeout is not None:  # bounded (a handler's own): follow its transactions
            follow_transactions(self._maker.kw["sync_session_class"])
        self._activate()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        try:
            if session is not None:
                try:
                    if exc_type is not None:
                        await session.rollback()
                except Exception:  # the connection may be gone; closing still frees it
                    logger.debug("rollback failed", exc_info=True)
                finally:
                    await session.close()
        finally:
            self._deactivate()

    @property
    def session(self) -> AsyncSession:
        """The scope's ``AsyncSession``, created on first use."""
        if self._session is None:
            self._session = self._maker()
        return self._session

    def active_session(self) -> AsyncSession | None:
        return self._session


async def commit(scope: AsyncScope) -> None:
    """Flush, then commit the scope's session (see
    :func:`socketio_dbctx.context.commit`)."""
    if not scope.used:
        return
    session = scope.active_session()
    if session is not None and session.in_transaction():
        await session.flush()
        await session.commit()


async def release(held: list[Callable[[], Any]] | None, failed: Callable[[], Any] | None) -> None:
    """Run (and await) the sends a scope held, in call order, after it committed; a
    failure is logged and counted, never raised."""
    if not held:
        return
    for send in held:
        try:
            result = send()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("a send or callback held until the commit failed")
            if failed is not None:
                failed()
