"""``AsyncDBContext``: the extension for python-socketio's ``AsyncServer`` and
SQLAlchemy's asyncio sessions (what it keeps: :mod:`socketio_dbctx.aio.state`)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Callable

import sqlalchemy as sa

from ..config import Settings, is_number, load_settings
from ..decorators import KeyFunc
from ..emits import install as install_emits
from ..errors import ContextSetupError
from ..idempotency import idempotency_table
from ..packets import install as install_packet_guard
from ..pipeline import Middleware
from ..pool import pool_status, worst_status
from ..shapes import EventSummary, HealthResult, PoolStatus
from .monitor import install_monitor
from .scope import AsyncScope, commit, release
from .state import AsyncRuntime, AsyncState
from .tasks import AsyncPeriodicTask

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

__all__ = ["AsyncDBContext", "dbctx_of"]

logger = logging.getLogger(__name__)

_CONTEXTS: weakref.WeakKeyDictionary[Any, AsyncDBContext] = weakref.WeakKeyDictionary()


def dbctx_of(server: Any) -> AsyncDBContext:
    """The :class:`AsyncDBContext` of a python-socketio ``AsyncServer``.

    :raises ContextSetupError: when there is none.
    """
    dbctx = _CONTEXTS.get(server) if server is not None else None
    if dbctx is None:
        raise ContextSetupError(
            "no AsyncDBContext for this server: create AsyncDBContext(sio, "
            "async_sessionmaker(engine)) before its first event"
        )
    return dbctx


class AsyncDBContext:
    """socketio_dbctx for python-socketio's ``AsyncServer`` (ASGI) and SQLAlchemy's
    asyncio extension: every event of an :class:`AsyncDBContextNamespace
    <socketio_dbctx.aio.AsyncDBContextNamespace>` (or of a function registered with
    :meth:`on`) runs with its own ``AsyncSession``, committed before the ack.

    :param sio: the ``socketio.AsyncServer``.
    :param maker: an ``async_sessionmaker`` bound to an ``AsyncEngine``.
    :param options: the ``DBCTX_`` settings as lower-case keywords.
    :raises ContextSetupError: for a bad option or a maker without an engine.
    """

    def __init__(self, sio: Any, maker: async_sessionmaker[Any], **options: Any) -> None:
        if maker is None or not callable(maker) or getattr(maker, "kw", {}).get("bind") is None:
            raise ContextSetupError(
                "AsyncDBContext needs an async_sessionmaker bound to an AsyncEngine: "
                "AsyncDBContext(sio, async_sessionmaker(create_async_engine(url)))"
            )
        self.sio = sio
        self.state = AsyncState(load_settings({}, options), maker)
        self._runtimes: dict[tuple[str, int], AsyncRuntime] = {}
        self._lock = threading.Lock()
        install_emits(sio)
        install_packet_guard(sio)
        _CONTEXTS[sio] = self
        #: the ``/monitor`` namespace (and cluster view), when ``monitor_auth`` is set
        self.monitor = install_monitor(self)

    @property
    def settings(self) -> Settings:
        """The validated settings."""
        return self.state.settings

    def runtime(
        self,
        owner: Any,
        namespace: str,
        overrides: dict[str, Any] | None = None,
        extra: Sequence[Middleware] = (),
        key: KeyFunc | None = None,
    ) -> AsyncRuntime:
        """The runtime of ``owner`` (a namespace object, or the function handlers of
        ``namespace``), built on first use."""
        ident = (namespace, id(owner))
        runtime = self._runtimes.get(ident)
        if runtime is None:
            with self._lock:
                runtime = self._runtimes.get(ident)
                if runtime is None:
                    runtime = self._runtimes[ident] = AsyncRuntime(
                        self.state, overrides or {}, extra, key
                    )
        return runtime

    def on(self, event: str, namespace: str | None = None) -> Callable[[Any], Any]:
        """Register an async (or plain) function ``handler(sid, *payload)`` for
        ``event`` through the pipeline, like ``sio.on``."""
        namespace = namespace or "/"

        def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
            runtime = self.runtime(self, namespace)

            async def piped(sid: str, *payload: Any) -> Any:
                return await runtime.run(namespace, event, sid, handler, payload)

            self.sio.on(event, namespace=namespace, handler=piped)
            return handler

        return decorate

    # -- scopes and tasks -------------------------------------------------------------

    @asynccontextmanager
    async def session_scope(self) -> AsyncIterator[AsyncSession]:
        """A fresh ``AsyncSession``: committed on success, rolled back on error, always
        closed; emits inside are held until the commit."""
        settings = self.settings
        async with AsyncScope(
            self.state.maker,
            label="scope",
            defer=settings.defer_emits,
            timeout=settings.statement_timeout,
        ) as scope:
            yield scope.session
            if settings.commit_on_success:
                await commit(scope)
            held = scope.take_held()
        await release(held, self.state.metrics.after_commit_failed)

    def start_background_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``await func(*args, **kwargs)`` as a task, inside its own
        :meth:`session_scope`; an exception is logged with its traceback."""

        async def run() -> None:
            try:
                async with self.session_scope():
                    result = func(*args, **kwargs)
                    if asyncio.iscoroutine(result):
                        await result
            except Exception:
                logger.exception("background task %s failed", getattr(func, "__name__", func))

        return self.state.spawn(run())

    def start_periodic_task(
        self, func: Callable[..., Any], interval: float, *args: Any, **kwargs: Any
    ) -> AsyncPeriodicTask:
        """Run ``await func(*args, **kwargs)`` every ``interval`` seconds, each run in its
        own :meth:`session_scope`; no connection is held between runs. An exception is
        logged and the loop goes on. Returns a handle with ``await stop()``.

        :raises ValueError: for a non-callable ``func`` or an ``interval`` <= 0.
        """
        if not callable(func):
            raise ValueError(f"func must be callable, got {type(func).__name__}")
        if not is_number(interval, 0, above=True):
            raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")

        async def run_once() -> None:
            async with self.session_scope():
                result = func(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    await result

        name = getattr(func, "__qualname__", repr(func))
        return AsyncPeriodicTask(self.state.spawn, run_once, float(interval), name)

    # -- operations -------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting events (``busy``), wait up to ``timeout`` seconds (default
        ``DBCTX_DRAIN_TIMEOUT``) for the ones in flight; True when none is left."""
        timeout = self.settings.drain_timeout if timeout is None else timeout
        idle = self.state.process.begin_drain()
        if idle is not None:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(idle.wait(), timeout)
        return self.state.process.idle()

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called."""
        return self.state.process.draining

    async def create_tables(self) -> None:
        """Create the idempotency keys' table on the default engine when missing."""
        bind: AsyncEngine = self.state.maker.kw["bind"]
        table = idempotency_table(sa.MetaData())
        async with bind.begin() as connection:
            await connection.run_sync(lambda sync: table.create(sync, checkfirst=True))

    def metrics(self) -> dict[str, EventSummary]:
        """Per-event counters and latency percentiles, keyed ``"namespace:event"``."""
        return self.state.metrics.snapshot()

    def pool_status(self) -> PoolStatus:
        """The default engine's pool dict (the same shape as the Flask version's)."""
        return self.pool_status_all()["default"]

    def pool_status_all(self) -> dict[str, PoolStatus]:
        """``{bind_name: pool dict}``."""
        s = self.settings
        return {
            name: pool_status(
                engine,
                name,
                checkouts=self.state.tracker.checkouts(engine),
                warn_utilization=s.warn_utilization,
                leak_threshold=s.leak_threshold,
                waiting=self.state.process.waiting + self.state.tracker.checkout_waiting,
                unhealthy=name == "default" and self.state.probe_failing,
                draining=self.draining,
            )
            for name, engine in self.state.engines().items()
        }

    def status(self) -> str:
        """The worst status of all pools."""
        return worst_status([p["status"] for p in self.pool_status_all().values()])

    async def health_check(self, timeout: float = 2.0) -> HealthResult:
        """``SELECT 1`` on the default engine within ``timeout`` seconds; never raises."""
        if self.draining:
            return {"healthy": False, "latency_ms": 0.0, "error": "draining"}
        bind: AsyncEngine = self.state.maker.kw["bind"]
        start = time.perf_counter()
        error: str | None
        try:

            async def probe() -> None:
                async with bind.connect() as connection:
                    await connection.exec_driver_sql("SELECT 1")

            await asyncio.wait_for(probe(), timeout)
        except asyncio.TimeoutError:
            error = f"timed out after {timeout}s"
        except Exception as exc:  # the type only: a driver's text may hold the URL
            error = type(exc).__name__
        else:
            error = None
        self.state.probe_failing = error is not None
        if error is not None:
            return {
                "healthy": False,
                "latency_ms": round((time.perf_counter() - start) * 1000, 3),
                "error": error,
            }
        return {
            "healthy": True,
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
            "error": None,
        }
