"""The statement watchdog: the client side of statement timeouts.

A server-side bound (:mod:`socketio_dbctx.timeouts`) needs a server that answers. A
frozen server, or a network that swallows packets, leaves the driver waiting on its
socket for ever (keepalives only help idle connections, ``tcp_user_timeout`` only
unacknowledged sends). While a statement or a COMMIT of a bounded scope waits, its
:class:`Watch` is started; the :class:`Watchdog`, a real OS thread in every async mode
(a green one could not run while a driver blocks the hub), shuts down the socket of a
connection that waited :data:`GRACE` seconds past the bound. The driver's blocked read
then fails at once, and SQLAlchemy discards the connection as disconnected. SQLite is
interrupted at the bound itself (``sqlite3.Connection.interrupt()``).

The watchdog's thread takes no lock and never logs: under eventlet and gevent the
``logging`` module's locks are green, and one taken from an OS thread while a
greenlet holds it is never handed back (eventlet: ``greenlet.error: Cannot switch to
a different thread``), which stops every later log call, and so every event, of the
process. It notes what it did; the next :meth:`Watchdog.register` or
:meth:`~Watchdog.unregister`, in the cut event's own thread or greenlet, logs it.
"""

from __future__ import annotations

import _socket
import logging
import os
import sys
import time
from collections import deque
from contextvars import ContextVar
from typing import Any, Callable

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

__all__ = [
    "GRACE",
    "WATCHDOG",
    "Watch",
    "Watchdog",
    "current_scope_var",
    "cut",
    "watch_statements",
]

logger = logging.getLogger(__name__)

#: Seconds past the statement timeout before the watchdog cuts a waiting connection:
#: the server's own bound answers first when the server is there to answer.
GRACE = 1.5
#: How often the watchdog looks.
TICK = 0.1

#: The scope running in this thread, greenlet or task, if any (what
#: :func:`socketio_dbctx.context.current_scope` returns). It lives here, below the
#: scopes, for the statement listeners: a bounded scope's ``watch`` is its
#: :class:`Watch`, any other scope's is None.
current_scope_var: ContextVar[Any] = ContextVar("socketio_dbctx_scope", default=None)


class Watch:
    """One bounded scope's waits on the database, seen by the :class:`Watchdog`.

    :param seconds: the statement timeout.
    :param interrupt: SQLite: interrupt at the bound instead of cutting a socket.
    :param grace: seconds past the bound before a socket is cut.
    :ivar cut: the watchdog cut a wait of this scope (its statement timed out).
    """

    __slots__ = ("connection", "cut", "interrupt", "limit", "since")

    def __init__(self, seconds: float, *, interrupt: bool = False, grace: float = GRACE) -> None:
        self.limit = seconds if interrupt else seconds + grace
        self.interrupt = interrupt
        self.connection: Any = None
        self.since: float | None = None
        self.cut = False

    def start(self, dbapi_connection: Any) -> None:
        """The scope now waits on ``dbapi_connection`` (a statement or COMMIT sent)."""
        self.connection = dbapi_connection
        self.since = time.monotonic()

    def stop(self) -> None:
        """The wait ended (answered, or failed)."""
        self.since = None

    def overdue(self, now: float) -> bool:
        since = self.since
        return since is not None and now - since > self.limit


def _fileno(dbapi_connection: Any) -> int | None:
    # psycopg2, psycopg and mysqlclient have fileno(); PyMySQL keeps its socket;
    # SQLAlchemy's asyncio adapters hold the driver's connection (asyncpg: a transport)
    driver = getattr(dbapi_connection, "driver_connection", None)
    transport = getattr(driver, "_transport", None)
    if transport is not None:
        sock = transport.get_extra_info("socket")
        return sock.fileno() if sock is not None else None
    fileno = getattr(dbapi_connection, "fileno", None)
    if callable(fileno):
        try:
            return int(fileno())
        except Exception:
            return None
    sock = getattr(dbapi_connection, "_sock", None)
    return sock.fileno() if sock is not None else None


#: What the watchdog's thread has to say: ``(level, message, args, exc_info)``.
Note = tuple[int, str, tuple[Any, ...], Any]


def cut(watch: Watch) -> Note | None:
    """End ``watch``'s wait now: interrupt SQLite, shut the socket of anything else.

    :returns: what to log about it (the caller logs it: see the module's docstring).
    """
    connection, watch.since = watch.connection, None
    watch.cut = True
    if watch.interrupt:
        connection.interrupt()
        return None
    fd = _fileno(connection)
    if fd is None or fd < 0:
        return (
            logging.WARNING,
            "cannot cut a hung %s: no socket found",
            (type(connection).__name__,),
            None,
        )
    # a socket object on a copy of the descriptor: shutdown() acts on the socket both
    # share, close() only on the copy. _socket: the unpatched one in green modes.
    sock = _socket.socket(fileno=os.dup(fd))
    try:
        sock.shutdown(_socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
    return (
        logging.WARNING,
        "cut a database connection that gave no answer for %.1fs",
        (watch.limit,),
        None,
    )


def _os_primitives() -> tuple[Callable[..., Any], Callable[[float], None]]:
    # A real OS thread and a real sleep, whatever eventlet or gevent patched.
    if "eventlet" in sys.modules:
        from eventlet import patcher

        if patcher.is_monkey_patched("thread"):
            return (
                patcher.original("_thread").start_new_thread,
                patcher.original("time").sleep,
            )
    if "gevent" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            return (
                monkey.get_original("_thread", "start_new_thread"),
                monkey.get_original("time", "sleep"),
            )
    import _thread

    return _thread.start_new_thread, time.sleep


class Watchdog:
    """The process's watchdog over every registered :class:`Watch`; its thread starts
    with the first registration (again after a fork)."""

    def __init__(self) -> None:
        # dict and deque operations are atomic under the GIL: no lock, which would be
        # green (and so unusable from the OS thread) in green modes
        self._watches: dict[int, Watch] = {}
        self._pid: int | None = None
        #: notes of the thread, logged by the next register() or unregister()
        self._notes: deque[Note] = deque()

    def register(self, watch: Watch) -> None:
        self._watches[id(watch)] = watch
        if self._pid != os.getpid():
            self._pid = os.getpid()
            start, sleep = _os_primitives()
            start(self._loop, (sleep,))
        if self._notes:
            self.log_notes()

    def unregister(self, watch: Watch) -> None:
        self._watches.pop(id(watch), None)
        if self._notes:
            self.log_notes()

    def log_notes(self) -> None:
        """Log what the thread noted, from the caller's thread or greenlet."""
        while True:
            try:
                level, message, args, exc_info = self._notes.popleft()
            except IndexError:
                return
            logger.log(level, message, *args, exc_info=exc_info)

    def _loop(self, sleep: Callable[[float], None]) -> None:
        pid = os.getpid()
        while self._pid == pid:
            sleep(TICK)
            now = time.monotonic()
            for watch in list(self._watches.values()):
                if watch.overdue(now):
                    try:
                        note = cut(watch)
                    except Exception:
                        note = (
                            logging.ERROR,
                            "the statement watchdog could not cut a connection",
                            (),
                            sys.exc_info(),
                        )
                    if note is not None:
                        self._notes.append(note)


#: The one watchdog of this process.
WATCHDOG = Watchdog()


def _current_watch() -> Watch | None:
    scope = current_scope_var.get()
    return None if scope is None else scope.watch


def _before_execute(conn: Connection, *args: Any) -> None:
    watch = _current_watch()
    if watch is not None:
        watch.start(conn.connection.dbapi_connection)


def _after_execute(conn: Connection, *args: Any) -> None:
    watch = _current_watch()
    if watch is not None:
        watch.stop()


def _on_error(context: Any) -> None:
    watch = _current_watch()
    if watch is not None:
        watch.stop()


def watch_statements(engine: Engine) -> None:
    """Start each statement of a bounded scope on ``engine`` under the watchdog.
    Installed the first time a bounded scope uses the engine (a statement listener
    costs every statement a little); idempotent."""
    if not sa_event.contains(engine, "before_cursor_execute", _before_execute):
        sa_event.listen(engine, "before_cursor_execute", _before_execute)
        sa_event.listen(engine, "after_cursor_execute", _after_execute)
        sa_event.listen(engine, "handle_error", _on_error)
