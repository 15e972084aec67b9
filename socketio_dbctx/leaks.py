"""Leak detection, after HikariCP's ``leakDetectionThreshold``.

The pool's ``checkout`` event records when, and for which event (``namespace:event``
and sid) or task, a connection was taken, with a short stack while the threshold is
on. A connection still out after ``DBCTX_LEAK_THRESHOLD`` seconds is logged once at
WARNING with where it was taken, and again at INFO when it comes back.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from contextvars import ContextVar
from typing import Any, Callable

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

__all__ = ["NOT_WAITING", "Checkout", "LeakWatchdog", "PoolTracker", "short_stack"]

logger = logging.getLogger("socketio_dbctx")

# Frames of these packages say nothing about who took the connection.
_SKIP = (
    "/sqlalchemy/",
    "<sqlalchemy",  # its generated wrappers
    "/socketio_dbctx/",
    "/flask_sqlalchemy/",
    "/contextlib.py",
)

Stack = tuple[tuple[str, int, str], ...]

#: Set in code whose checkouts should not count as ``waiting`` (the health probe).
NOT_WAITING: ContextVar[bool] = ContextVar("socketio_dbctx_not_waiting", default=False)
#: ``() -> (label, sid, stack or None)`` for whoever checks out now
Describe = Callable[[], "tuple[str | None, str | None, Stack | None]"]


def short_stack(limit: int = 6) -> Stack:
    """The caller's innermost ``limit`` frames outside SQLAlchemy and this package.

    Walks frames directly (a few microseconds) instead of ``traceback.extract_stack``;
    source lines are only looked up when a leak is reported.
    """
    frames: list[tuple[str, int, str]] = []
    frame = sys._getframe(1)
    while frame is not None and len(frames) < limit:
        filename = frame.f_code.co_filename
        # SQLAlchemy 2.0 compiles some methods from strings: filename "<string>"
        module = frame.f_globals.get("__name__") or ""
        if not module.startswith("sqlalchemy.") and not any(part in filename for part in _SKIP):
            frames.append((filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back  # type: ignore[assignment]
    return tuple(frames)


def _format(stack: Stack) -> str:
    return "".join(f'  File "{f}", line {n}, in {name}\n' for f, n, name in stack)


class Checkout:
    """One connection checked out of a pool right now."""

    __slots__ = ("label", "reported", "sid", "since", "stack")

    def __init__(self, label: str | None, sid: str | None, stack: Stack | None) -> None:
        self.since = time.monotonic()
        self.label = label
        self.sid = sid
        self.stack = stack
        self.reported = False

    def age(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.since


class PoolTracker:
    """Follows the checkouts of the engines it is attached to.

    :param describe: returns ``(label, sid, stack)`` of whoever checks out now; a
        ``None`` stack is filled in with :func:`short_stack` while the threshold is on.
    :param threshold: leak threshold in seconds; 0 turns reports and stacks off.
    """

    def __init__(self, describe: Describe, threshold: float = 0.0) -> None:
        self._describe = describe
        self.threshold = threshold
        self.leaks_total = 0
        #: callers waiting for a connection of a full pool right now
        self.checkout_waiting = 0
        self._engines: weakref.WeakKeyDictionary[Engine, dict[int, Checkout]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def attach(self, engine: Engine) -> bool:
        """Start following ``engine`` (once; a disposed and recreated pool keeps the
        listeners). Returns True the first time."""
        with self._lock:
            if engine in self._engines:
                return False
            checkouts = self._engines[engine] = {}
        describe, tracker = self._describe, self

        def on_checkout(dbapi_conn: Any, rec: Any, proxy: Any) -> None:
            label, sid, stack = describe()
            if stack is None and tracker.threshold:
                # outside an event the caller is unknown: walking the stack is worth it here
                stack = short_stack()
            checkouts[id(rec)] = Checkout(label, sid, stack)

        def on_checkin(dbapi_conn: Any, rec: Any) -> None:
            checkout = checkouts.pop(id(rec), None)
            if checkout is not None and checkout.reported:
                logger.info(
                    "connection reported as leaked was returned after %.1fs (taken by %s, sid %s)",
                    checkout.age(),
                    checkout.label or "code outside any event",
                    checkout.sid,
                )

        event.listen(engine, "checkout", on_checkout)
        event.listen(engine, "checkin", on_checkin)
        return True

    def watch_waits(self, engine: Engine) -> None:
        """Count callers waiting for a connection of a full ``QueuePool``.

        SQLAlchemy has no event for a checkout that has to wait, so the pool's
        ``_do_get`` is wrapped, once per pool object (``engine.dispose()`` makes a new
        one, which the next call wraps).
        """
        pool = engine.pool
        if not isinstance(pool, QueuePool) or getattr(pool, "_dbctx_waits", False):
            return
        original = pool._do_get
        capacity = pool.size() + pool._max_overflow if pool._max_overflow >= 0 else None
        tracker = self

        def do_get() -> Any:
            if capacity is None or pool.checkedout() < capacity or NOT_WAITING.get():
                return original()
            with tracker._lock:
                tracker.checkout_waiting += 1
            try:
                return original()
            finally:
                with tracker._lock:
                    tracker.checkout_waiting -= 1

        pool._do_get = do_get  # type: ignore[method-assign]
        pool._dbctx_waits = True  # type: ignore[attr-defined]

    def checkouts(self, engine: Engine) -> list[Checkout]:
        """The connections of ``engine`` checked out now (a snapshot)."""
        checkouts = self._engines.get(engine)
        return list(checkouts.values()) if checkouts else []

    def scan(self) -> list[dict[str, Any]]:
        """Report checkouts older than the threshold (each once) and list them.

        :returns: the ``leaks`` entries of the monitor payload, oldest first.
        """
        if not self.threshold:
            return []
        now = time.monotonic()
        leaks: list[tuple[float, Checkout]] = []
        for checkouts in list(self._engines.values()):
            for checkout in list(checkouts.values()):
                age = checkout.age(now)
                if age < self.threshold:
                    continue
                leaks.append((age, checkout))
                if not checkout.reported:
                    checkout.reported = True
                    self.leaks_total += 1
                    logger.warning(
                        "apparent connection leak: a connection taken %.1fs ago by %s (sid %s) "
                        "is still checked out (DBCTX_LEAK_THRESHOLD=%ss); taken at:\n%s",
                        age,
                        checkout.label or "code outside any event",
                        checkout.sid,
                        self.threshold,
                        _format(checkout.stack or ()),
                    )
        leaks.sort(key=lambda item: -item[0])
        return [{"age_s": round(age, 1), "event": c.label, "sid": c.sid} for age, c in leaks]


class LeakWatchdog:
    """Scans a tracker every so often so leaks are reported even when nobody looks.

    Holds the tracker weakly and ends when it is gone.
    """

    def __init__(
        self,
        tracker: PoolTracker,
        spawn: Callable[[Callable[[], None]], Any],
        sleep: Callable[[float], Any],
    ) -> None:
        self._tracker = weakref.ref(tracker)
        self._sleep = sleep
        self.interval = max(0.05, min(1.0, tracker.threshold / 4))
        spawn(self._loop)

    def _loop(self) -> None:
        while True:
            self._sleep(self.interval)
            tracker = self._tracker()
            if tracker is None:
                return
            try:
                tracker.scan()
            except Exception:  # never let the watchdog die of a transient oddity
                logger.debug("leak scan failed", exc_info=True)
            del tracker
