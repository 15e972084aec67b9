"""``AsyncDBContextNamespace``: every event of a python-socketio ``AsyncNamespace`` with
its own ``AsyncSession``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import socketio

from ..config import NamespaceSettings
from ..context import current_scope
from ..decorators import KeyFunc
from ..errors import ContextSetupError
from ..pipeline import Middleware
from .extension import dbctx_of

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["AsyncDBContextNamespace"]


class AsyncDBContextNamespace(NamespaceSettings, socketio.AsyncNamespace):  # type: ignore[misc]
    """A python-socketio ``AsyncNamespace`` whose ``on_<event>(self, sid, *payload)``
    handlers (coroutines or plain functions) each run with a fresh ``AsyncSession``
    (:attr:`db_session`), committed before the ack, rolled back on error, always
    closed; with the Flask version's retries, admission, metrics, held emits,
    statement timeout and idempotency keys. Class attributes named after settings
    override the extension's (see :class:`~socketio_dbctx.NamespaceSettings`);
    ``idempotency_key`` and ``extra_middleware`` as on
    :class:`~socketio_dbctx.DBContextNamespace`; ``error(self, exc)`` (may be async)
    turns a failure into the ack.
    """

    extra_middleware: Sequence[Middleware] = ()
    idempotency_key: KeyFunc | None = None

    @property
    def db_session(self) -> AsyncSession:
        """The current event's ``AsyncSession``."""
        scope = current_scope()
        if scope is None:
            raise ContextSetupError(
                "no socketio_dbctx scope is active: use self.db_session inside an event "
                "handler, or open one with `async with dbctx.session_scope()`"
            )
        return scope.session  # type: ignore[no-any-return]

    async def trigger_event(self, event: str, *args: Any) -> Any:
        """Run ``on_<event>`` through the pipeline; return the ack."""
        handler = getattr(self, "on_" + (event or ""), None)
        if handler is None:
            return None
        runtime = dbctx_of(self.server).runtime(
            self,
            self.namespace,
            self.setting_overrides(),
            self.extra_middleware,
            getattr(type(self), "idempotency_key", None),
        )
        sid = args[0] if args else None
        return await runtime.run(self.namespace, event, sid, handler, args[1:])  # type: ignore[arg-type]
