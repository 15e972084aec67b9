"""Periodic tasks on the event loop, each run in its own ``AsyncSession`` scope (the
asyncio face of :class:`~socketio_dbctx.PeriodicTask`: the same handle, the same
fixed-rate rule, no connection held between runs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, Callable

__all__ = ["AsyncPeriodicTask"]

logger = logging.getLogger(__name__)


class AsyncPeriodicTask:
    """Handle of a task started by :meth:`AsyncDBContext.start_periodic_task
    <socketio_dbctx.aio.AsyncDBContext.start_periodic_task>`: runs every ``interval``
    seconds from the start, one at a time; a run that overruns delays the next one.

    :ivar runs: runs so far. :ivar failures: runs that raised (logged).
    """

    def __init__(
        self,
        spawn: Callable[[Any], asyncio.Task[Any]],
        run_once: Callable[[], Awaitable[Any]],
        interval: float,
        name: str,
    ) -> None:
        self.interval = interval
        self.name = name
        self.runs = 0
        self.failures = 0
        self._run_once = run_once
        self._stop = asyncio.Event()
        self._task = spawn(self._loop())

    async def _loop(self) -> None:
        next_run = time.monotonic()
        while not self._stop.is_set():
            try:
                await self._run_once()
            except Exception:
                self.failures += 1
                logger.exception("periodic task %s failed; it will run again", self.name)
            self.runs += 1
            next_run = max(next_run + self.interval, time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_run - time.monotonic()))

    @property
    def running(self) -> bool:
        """True until the loop has ended."""
        return not self._task.done()

    async def stop(self, timeout: float | None = None) -> bool:
        """Ask the loop to end; wait up to ``timeout`` seconds for the current run.

        :returns: True when the loop has ended.
        """
        self._stop.set()
        if timeout is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return not self.running

    def __repr__(self) -> str:
        return f"<AsyncPeriodicTask {self.name} every {self.interval}s runs={self.runs}>"
