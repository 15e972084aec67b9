"""``WebSocketContextHelper``: per-message app contexts and sessions for asyncio code.

For an asyncio WebSocket client or server that uses the Flask app's models. A
coroutine function runs on the event loop inside its own app context and session;
a plain function runs in a worker thread (``asyncio.to_thread``) inside its own,
so the loop is never blocked by a synchronous driver.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Callable

from flask import Flask
from sqlalchemy.orm import Session
from tenacity import AsyncRetrying, RetryError, retry_if_exception, stop_after_attempt

from .config import is_number, load_settings
from .context import async_scope, session_scope
from .errors import RetryExhaustedError
from .health import health_check
from .leaks import PoolTracker
from .pool import pool_status
from .retry import backoff
from .sessions import FlaskSQLAlchemySource
from .shapes import PoolStatus
from .state import app_state
from .transient import is_transient

if TYPE_CHECKING:
    from types import TracebackType

    from flask_sqlalchemy import SQLAlchemy

__all__ = ["WebSocketContextHelper"]

logger = logging.getLogger(__name__)


def _is_coroutine_function(func: Callable[..., Any]) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - an async __call__ counts too
    )


def _check_callable(func: Any) -> None:
    if not callable(func):
        raise ValueError(f"func must be callable, got {type(func).__name__}")


class WebSocketContextHelper:
    """Run code in a fresh Flask app context and session per message.

    :param app: the Flask app whose database to use.
    :param db: the Flask-SQLAlchemy instance; omitted: the app's ``DBContext`` session
        source when there is one, else ``app.extensions["sqlalchemy"]``.
    """

    def __init__(self, app: Flask, db: SQLAlchemy | None = None) -> None:
        if not isinstance(app, Flask):
            raise ValueError(f"app must be a Flask application, got {type(app).__name__}")
        self.app = app
        state = app_state(app) if "dbctx" in app.extensions and db is None else None
        self._source = state.source if state else FlaskSQLAlchemySource(db)
        self._settings = state.settings if state else load_settings(app.config, {})
        self._tracker = state.tracker if state else PoolTracker(lambda: (None, None, None))

    # -- running code ---------------------------------------------------------------

    async def execute_with_db_context(
        self, func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Call ``func`` in its own app context and session; commit on success, roll
        back on error, remove the session either way.

        :raises ValueError: when ``func`` is not callable.
        """
        _check_callable(func)
        logger.debug("executing %s in a DB context", getattr(func, "__name__", func))
        if _is_coroutine_function(func):
            async with self.message_context():
                return await func(*args, **kwargs)
        return await asyncio.to_thread(self._run_sync, func, args, kwargs)

    def _run_sync(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        with session_scope(
            self.app, self._source, commit_on_success=self._settings.commit_on_success
        ):
            return func(*args, **kwargs)

    @asynccontextmanager
    async def message_context(self) -> AsyncIterator[Session]:
        """``async with helper.message_context() as session:`` one message's scope."""
        async with async_scope(
            self.app, self._source, commit_on_success=self._settings.commit_on_success
        ) as session:
            yield session

    async def safe_execute_with_retry(
        self,
        func: Callable[..., Any],
        *args: Any,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        **kwargs: Any,
    ) -> Any:
        """Like :meth:`execute_with_db_context`, retrying transient failures.

        At most ``max_retries + 1`` calls, each in a fresh context, with full-jitter
        exponential backoff from ``retry_delay`` (capped at ``DBCTX_RETRY_MAX_DELAY``).

        :raises ValueError: for a non-callable ``func`` or a negative setting.
        :raises RetryExhaustedError: when every attempt failed transiently; the last
            error is its ``__cause__``. A non-transient error propagates unchanged.
        """
        _check_callable(func)
        if not is_number(max_retries, 0, integer=True):
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not is_number(retry_delay, 0):
            raise ValueError(f"retry_delay must be a number >= 0, got {retry_delay!r}")

        def log_retry(state: Any) -> None:
            exc = state.outcome.exception()
            logger.warning(
                "retrying %s (attempt %d of %d) after %s: %s",
                getattr(func, "__name__", func),
                state.attempt_number + 1,
                max_retries + 1,
                type(exc).__name__,
                exc,
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(max_retries + 1),
            wait=backoff(retry_delay, max(retry_delay, self._settings.retry_max_delay)),
            retry=retry_if_exception(is_transient),
            before_sleep=log_retry,
        )
        try:
            return await retrying(self.execute_with_db_context, func, *args, **kwargs)
        except RetryError as exhausted:
            last = exhausted.last_attempt.exception()
            assert last is not None
        raise RetryExhaustedError(max_retries + 1, last) from last

    # -- observation ----------------------------------------------------------------

    def get_connection_pool_status(self) -> PoolStatus:
        """The pool dict of the default engine."""
        engine = self._source.engines(self.app)["default"]
        self._tracker.attach(engine)
        status = pool_status(
            engine,
            "default",
            checkouts=self._tracker.checkouts(engine),
            warn_utilization=self._settings.warn_utilization,
            leak_threshold=self._settings.leak_threshold,
        )
        if status["status"] in ("warning", "exhausted"):
            logger.warning(
                "connection pool %s: %.1f%% in use", status["status"], status["utilization"] * 100
            )
        return status

    def validate_connection_health(self) -> bool:
        """True when ``SELECT 1`` succeeds within 2 s; never raises."""
        try:
            engine = self._source.engines(self.app).get("default")
        except Exception:
            logger.warning("connection health check could not find an engine", exc_info=True)
            return False
        result = health_check(engine, 2.0)
        if not result["healthy"]:
            logger.warning("connection health check failed: %s", result["error"])
        return bool(result["healthy"])

    # -- async with -----------------------------------------------------------------

    async def __aenter__(self) -> WebSocketContextHelper:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Every call already released its own session; nothing is held between calls.
        return None
