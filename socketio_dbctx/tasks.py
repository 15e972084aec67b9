"""Background and periodic tasks that hold a connection only while they work.

Each run gets its own scope, so a loop that wakes every second holds no
connection while it sleeps (instead of one ``with app.app_context():`` around the
whole loop, which holds a session, and often a connection, for ever).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

__all__ = ["PeriodicTask", "spawn"]

logger = logging.getLogger(__name__)


def spawn(socketio: Any, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Start ``target`` in the async mode's own kind of thread.

    Without a SocketIO instance, a daemon ``threading.Thread`` is used.
    """
    if socketio is not None and getattr(socketio, "server", None) is not None:
        return socketio.start_background_task(target, *args, **kwargs)
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def make_event(socketio: Any) -> Any:
    """An event object of the async mode (green under eventlet and gevent)."""
    server = getattr(socketio, "server", None)
    if server is not None:
        return server.eio.create_event()
    return threading.Event()


class PeriodicTask:
    """Handle of a task started by :meth:`DBContext.start_periodic_task`.

    Runs happen at a fixed rate: every ``interval`` seconds from the start, one at a
    time; a run that overruns delays the next one instead of piling up.
    """

    def __init__(
        self,
        socketio: Any,
        run_once: Callable[[], Any],
        interval: float,
        name: str,
    ) -> None:
        self.interval = interval
        self.name = name
        self.runs = 0
        self.failures = 0
        self._run_once = run_once
        self._stop = make_event(socketio)
        self._done = make_event(socketio)
        self._thread = spawn(socketio, self._loop)

    def _loop(self) -> None:
        next_run = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    self._run_once()
                except Exception:
                    self.failures += 1
                    logger.exception("periodic task %s failed; it will run again", self.name)
                self.runs += 1
                next_run = max(next_run + self.interval, time.monotonic())
                self._stop.wait(max(0.0, next_run - time.monotonic()))
        finally:
            self._done.set()

    @property
    def running(self) -> bool:
        """True until the loop has ended."""
        return not self._done.is_set()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the loop to end; wait up to ``timeout`` seconds for the current run.

        :returns: True when the loop has ended.
        """
        self._stop.set()
        if timeout is not None:
            self._done.wait(timeout)
        return not self.running

    def __repr__(self) -> str:
        return f"<PeriodicTask {self.name} every {self.interval}s runs={self.runs}>"
