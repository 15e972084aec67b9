"""What :class:`~socketio_dbctx.aio.AsyncDBContext` keeps (:class:`AsyncState`) and
one namespace's settings, admission and chains (:class:`AsyncRuntime`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from ..admission import Admission, ProcessLimit
from ..config import Settings
from ..decorators import KeyFunc
from ..dispatch import LIFECYCLE, spec_of
from ..idempotency import KeyStore
from ..leaks import LeakWatchdog, PoolTracker
from ..metrics import EventMetrics
from ..pipeline import Event, Middleware, build_chain
from ..pool import pool_capacity
from ..state import describe_checkout
from ..throttle import LogThrottle
from ..timeouts import reset_on_checkin
from ..transactions import follow_commits, follow_transactions
from . import steps

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

__all__ = ["AsyncRuntime", "AsyncState"]


class AsyncState:
    """What the extension keeps: the settings, the session maker (sessions of a
    ``Session`` subclass of our own, so our listeners follow only them), metrics,
    the checkout tracker, keys and the process's admission limit.

    :param settings: validated settings.
    :param maker: the user's ``async_sessionmaker``.
    """

    async_mode = "asyncio"

    def __init__(self, settings: Settings, maker: async_sessionmaker[Any]) -> None:
        self.settings = settings
        base = maker.kw.get("sync_session_class") or Session
        followed = type(f"DBContext{base.__name__}", (base,), {})
        follow_commits(followed)
        bind = maker.kw.get("bind")
        if settings.statement_timeout is not None or (
            bind is not None and bind.dialect.name == "postgresql"
        ):
            follow_transactions(followed)
        self.maker = type(maker)(
            class_=maker.class_, **{**maker.kw, "sync_session_class": followed}
        )
        self.metrics = EventMetrics()
        self.log_throttle = LogThrottle()
        self.tracker = PoolTracker(describe_checkout, settings.leak_threshold)
        if settings.leak_threshold:
            # a thread of its own: a scan is a few dict reads, and must go on while the
            # event loop is busy (which is when leaks happen)
            self._leak_watchdog = LeakWatchdog(self.tracker, _start_thread, time.sleep)
        self.keys = KeyStore(settings.idempotency_ttl, self._spawn_purge)
        #: the last health check of the default engine failed (the pools say unhealthy)
        self.probe_failing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        engine = self.engines().get("default")
        limit = settings.max_concurrent_events
        if limit is None and engine is not None:
            limit = pool_capacity(engine)
        self.process = ProcessLimit("asyncio", limit)
        for each in self.engines().values():
            self.tracker.attach(each)
            self.tracker.watch_waits(each)
            reset_on_checkin(each)

    def engines(self) -> dict[str, Engine]:
        """The sync faces of the maker's engines (pools, events), ``"default"`` first."""
        bind: AsyncEngine | None = self.maker.kw.get("bind")
        return {"default": bind.sync_engine} if bind is not None else {}

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the running loop, kept until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_purge(self, target: Callable[[], Any]) -> None:
        # the key store's purge is sync SQLAlchemy code: run it in a greenlet
        self.spawn(greenlet_spawn(target))


def _start_thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, name="socketio_dbctx leak watchdog", daemon=True).start()


class AsyncRuntime:
    """One namespace's settings, admission and chains."""

    def __init__(
        self,
        state: AsyncState,
        overrides: dict[str, Any],
        extra: Sequence[Middleware] = (),
        key: KeyFunc | None = None,
    ) -> None:
        self.state = state
        self.settings = state.settings.override(overrides)
        self.admission = Admission(
            state.process, self.settings.max_in_flight_per_client, self.settings.queue_timeout
        )
        inner = (steps.metrics, steps.retry, steps.transaction)
        user = tuple(_adapt(mw) for mw in extra)
        self.chain = build_chain(
            (steps.errors, steps.admission(self.admission), *inner, steps.idempotency(key), *user),
            steps.call_handler,
        )
        self.lifecycle_chain = build_chain(
            (steps.errors, *inner, *user),
            steps.call_handler,
        )

    async def run(
        self,
        namespace: str,
        name: str,
        sid: str,
        handler: Callable[..., Any],
        payload: tuple[Any, ...],
    ) -> Any:
        """Run one event through the chain; return the ack."""
        spec = spec_of(handler)
        if name in LIFECYCLE:
            # connect gets (environ, auth), disconnect (reason): pass what is accepted
            while payload and not spec.accepts(len(payload) + 1):
                payload = payload[:-1]
        event = Event(
            None,  # type: ignore[arg-type]
            self.state,  # type: ignore[arg-type]
            self.settings,
            namespace,
            name,
            sid,
            payload,
            handler,
            spec,
            time.sleep,
        )
        chain = self.lifecycle_chain if name in LIFECYCLE else self.chain
        return await chain(event)


def _adapt(middleware: Middleware) -> steps.AsyncWrap:
    def wrap(rest: steps.AsyncStep) -> steps.AsyncStep:
        async def step(event: Event) -> Any:
            result = middleware(event, lambda: rest(event))
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            return result

        return step

    return wrap
