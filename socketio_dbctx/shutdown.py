"""Graceful shutdown: drain on a signal, close every connection, end the process.

:class:`SignalDrain` is what :meth:`DBContext.drain_on_signals
<socketio_dbctx.DBContext.drain_on_signals>` installs. On the first signal it starts
a background task of the async mode (a signal handler must return at once) that

1. drains (new events are acked ``busy``, the ones in flight finish, commit and ack),
2. closes every Engine.IO connection without waiting on its send queue, then gives
   the close packets up to :data:`CLOSE_GRACE` seconds to leave,
3. raises the signal again; the handler, in the main thread (the only one allowed
   to change handlers), puts the previous handlers back and raises it once more, so
   the process ends as that signal would have ended it (under gunicorn: the worker's
   own exit).

A second signal puts the default handler back and raises it: the process stops at once.

Why not engineio's ``Server.disconnect()``: it closes each socket with ``wait=True``,
which joins the socket's send queue, and in threading mode a client's own close can
leave an item nobody takes, so it can wait forever (about 1 run in 4 with five clients).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from flask import Flask

    from .state import AppState

__all__ = ["CLOSE_GRACE", "SignalDrain", "close_connections", "drain_apps"]

logger = logging.getLogger(__name__)

#: Seconds given to the close packets to leave before the process ends.
CLOSE_GRACE = 1.0

_DEFAULT_ENDS = (None, signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)


def drain_apps(apps: Sequence[tuple[Flask, AppState]], timeout: float | None) -> bool:
    """Drain every app: refuse new events in all of them first, then wait for each
    one's events in flight, all within ``timeout`` seconds (``None``: the longest
    ``DBCTX_DRAIN_TIMEOUT`` among them).

    :returns: True when no event is left in any of them.
    """
    if timeout is None:
        timeout = max((state.settings.drain_timeout for _, state in apps), default=0.0)
    deadline = time.monotonic() + timeout
    for app, state in apps:
        state.drain(app, 0)
    drained = True
    for app, state in apps:
        drained = state.drain(app, max(0.0, deadline - time.monotonic())) and drained
    if drained:
        logger.info("drained: no event in flight")
    else:
        logger.warning("drain timed out after %ss with events still in flight", timeout)
    return drained


def close_connections(server: Any, grace: float = CLOSE_GRACE) -> int:
    """Close every Engine.IO connection of a python-socketio ``server`` (its clients'
    disconnect handlers run), without waiting on any send queue; then wait up to
    ``grace`` seconds for the close packets to be taken from those queues.

    :returns: how many connections were closed.
    """
    eio = server.eio
    sockets = list(eio.sockets.values())
    for sock in sockets:
        try:
            sock.close(wait=False, reason=eio.reason.SERVER_DISCONNECT)
        except Exception:
            logger.debug("closing Engine.IO socket %s failed", sock.sid, exc_info=True)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(not s.queue.empty() for s in sockets):
        eio.sleep(0.02)
    if sockets:
        eio.sleep(min(0.1, grace))  # from the queue onto the wire
    return len(sockets)


class SignalDrain:
    """Drains, closes and exits on ``signals``.

    :param drain: ``drain(timeout) -> bool`` (:meth:`DBContext.drain
        <socketio_dbctx.DBContext.drain>`).
    :param socketio: the ``SocketIO`` instance (its background tasks and server).
    :param signals: the signals to handle.
    :param timeout: the drain timeout; ``None``: ``DBCTX_DRAIN_TIMEOUT``.
    """

    def __init__(
        self,
        drain: Callable[[float | None], bool],
        socketio: Any,
        signals: Sequence[int],
        timeout: float | None,
    ) -> None:
        self._drain = drain
        self._socketio = socketio
        self.signals = tuple(signals)
        self.timeout = timeout
        self.previous: dict[int, Any] = {}
        #: the signal that started the shutdown, once one came
        self.received: int | None = None
        self._done = False  # drained and closed: the next signal ends the process

    def install(self) -> SignalDrain:
        """Install the handlers (from the main thread); remember the previous ones."""
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._done:  # raised by _shut_down: end as the previous handler would
            self.restore()
            if self.previous.get(signum) in _DEFAULT_ENDS:
                signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is not None:
            logger.warning("%s again: stopping at once", name)
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        logger.warning("%s: draining, then closing every connection and exiting", name)
        self._socketio.start_background_task(self._shut_down, signum)

    def _shut_down(self, signum: int) -> None:
        started = time.monotonic()
        try:
            drained = self._drain(self.timeout)
        except Exception:
            logger.exception("the drain failed; exiting anyway")
            drained = False
        try:
            closed = close_connections(self._socketio.server)
        except Exception:
            logger.exception("closing the connections failed; exiting anyway")
            closed = 0
        logger.warning(
            "shutdown after %.1fs: %s, %d connection(s) closed; exiting",
            time.monotonic() - started,
            "drained" if drained else "drain timed out",
            closed,
        )
        self._done = True
        os.kill(os.getpid(), signum)  # handled in the main thread: see _handle
