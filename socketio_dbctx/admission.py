"""Admission control: bound concurrent events per client and per process.

An event needs a slot of its own client (sid) and one of the process, so a client
flooding events queues behind itself instead of taking every pooled connection. A
wait longer than ``DBCTX_QUEUE_TIMEOUT`` ends in :class:`BusyError`.

Counting is done under one plain lock per app (a few dict operations: two
pure-Python semaphores per event cost several times more); only an event that has to
wait gets an event object of the async mode, so waiting never blocks a whole process
under eventlet or gevent. Waiters are served first come, first served, each as soon
as both its client and the process have a free slot. The pipeline step that uses
this lives in :mod:`socketio_dbctx.middleware`.

A drain (:meth:`ProcessLimit.drain`) refuses new events and the waiting ones with
:class:`BusyError` (they have not started: nothing was applied) and waits until the
running ones have finished; it is the process count, so it knows.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

from .errors import BusyError

__all__ = ["DRAIN_RETRY_AFTER", "Admission", "ProcessLimit", "event_factory"]

#: ``retry_after`` (seconds) of an event refused because the process drains: long enough
#: for the client to have reconnected to another worker.
DRAIN_RETRY_AFTER = 1.0


def event_factory(async_mode: str | None) -> Callable[[], Any]:
    """The ``Event`` class of an async mode (``set()``, ``wait(timeout)``; asyncio's
    ``wait()`` is a coroutine without a timeout)."""
    if async_mode == "asyncio":
        import asyncio

        return asyncio.Event
    if async_mode == "eventlet":
        from eventlet.green.threading import Event as EventletEvent

        return EventletEvent  # type: ignore[no-any-return]
    if async_mode == "gevent":
        from gevent.event import Event as GeventEvent

        return GeventEvent  # type: ignore[no-any-return]
    return threading.Event


class _Waiter:
    __slots__ = ("admission", "admitted", "event", "sid")

    def __init__(self, admission: Admission, sid: str | None, event: Any) -> None:
        self.admission = admission
        self.sid = sid
        self.event = event
        self.admitted = False


class ProcessLimit:
    """The process-wide slot count of one app, shared by all its namespaces.

    :param async_mode: ``"threading"``, ``"eventlet"`` or ``"gevent"``.
    :param limit: events at once in this process; ``None`` or 0 = no limit.
    """

    def __init__(self, async_mode: str | None, limit: int | None) -> None:
        self.limit = limit or None
        self.make_event = event_factory(async_mode)
        self.running = 0
        self.waiters: deque[_Waiter] = deque()  # first come, first served
        self.lock = threading.Lock()
        #: set by :meth:`drain`: new events are refused
        self.draining = False
        self._idle: Any = None  # set when the last running event of a drain finishes

    def drain(self, timeout: float | None) -> bool:
        """Refuse new and waiting events from now on; wait up to ``timeout`` seconds
        (``None``: without end) for the running ones to finish.

        :returns: True when none is running any more.
        """
        idle = self.begin_drain()
        if idle is not None:
            idle.wait(timeout)
        return self.idle()

    def begin_drain(self) -> Any:
        """Refuse new and waiting events from now on; returns the event set when the
        last running one finishes, or None when none runs."""
        with self.lock:
            self.draining = True
            refused = list(self.waiters)
            self.waiters.clear()
            for waiter in refused:  # woken without being admitted: they answer busy
                waiter.event.set()
            if not self.running:
                return None
            if self._idle is None:
                self._idle = self.make_event()
            return self._idle

    def idle(self) -> bool:
        """Whether no event is running."""
        with self.lock:
            return not self.running

    @property
    def waiting(self) -> int:
        """Events waiting for admission right now."""
        return len(self.waiters)

    def has_room(self) -> bool:
        """Whether one more event may run (call with :attr:`lock` held)."""
        return self.limit is None or self.running < self.limit

    def queue(self, waiter: _Waiter) -> None:
        """Add ``waiter`` at the back (with :attr:`lock` held)."""
        self.waiters.append(waiter)

    def withdraw(self, waiter: _Waiter) -> None:
        """Take a waiter that gave up, and was not admitted, out of the queue (with
        :attr:`lock` held)."""
        self.waiters.remove(waiter)

    def settle(self) -> None:
        """Admit waiters, oldest first, while slots allow (with :attr:`lock` held)."""
        if not self.waiters:
            return
        for waiter in list(self.waiters):
            if not self.has_room():
                return
            if waiter.admission.client_has_room(waiter.sid):
                self.waiters.remove(waiter)
                waiter.admission.take(waiter.sid)
                waiter.admitted = True
                waiter.event.set()


class Admission:
    """Admission of one namespace's events in one app.

    :param process: the app's :class:`ProcessLimit`.
    :param per_client: events of one sid at once; 0 = no limit.
    :param timeout: seconds an event may wait, in all.
    """

    def __init__(self, process: ProcessLimit, per_client: int, timeout: float) -> None:
        self.process = process
        self.per_client = per_client
        self.timeout = timeout
        self._clients: dict[str | None, int] = {}

    @property
    def unlimited(self) -> bool:
        """True when neither a process nor a per-client limit applies."""
        return self.process.limit is None and not self.per_client

    def client_has_room(self, sid: str | None) -> bool:
        """Whether ``sid`` may run one more event (with the process lock held)."""
        return not self.per_client or sid is None or self._clients.get(sid, 0) < self.per_client

    def take(self, sid: str | None) -> None:
        """Count one more running event of ``sid`` (with the process lock held)."""
        self.process.running += 1
        if self.per_client and sid is not None:
            self._clients[sid] = self._clients.get(sid, 0) + 1

    def enter(self, sid: str | None) -> _Waiter | None:
        """Take a slot for ``sid`` now (None), or queue for one: wait on the returned
        waiter's event (up to :attr:`timeout`), then call :meth:`admitted`.

        :raises BusyError: while draining.
        """
        process = self.process
        per_client = self.per_client
        # acquire()/release() rather than ``with``, here and in leave(): ``with`` makes
        # two bound methods each time, and these run for every event
        lock = process.lock
        lock.acquire()
        try:
            if process.draining:
                raise _draining()
            if (
                not process.waiters  # nobody may overtake a waiter that was here first
                and (process.limit is None or process.running < process.limit)
                and (not per_client or sid is None or self._clients.get(sid, 0) < per_client)
            ):  # self.take(sid), inlined: this runs for every event
                process.running += 1
                if per_client and sid is not None:
                    self._clients[sid] = self._clients.get(sid, 0) + 1
                return None
            waiter = _Waiter(self, sid, process.make_event())
            process.queue(waiter)
            process.settle()
        finally:
            lock.release()
        return waiter

    def admitted(self, waiter: _Waiter) -> None:
        """After the wait on ``waiter`` ended (woken or timed out): return when it was
        admitted, else take it out of the queue.

        :raises BusyError: not admitted in time, or refused by a drain.
        """
        if waiter.admitted:
            return
        process = self.process
        with process.lock:
            if waiter.admitted:  # admitted just as the wait ended
                return
            if process.draining:  # refused by the drain (already out of the queue)
                if waiter in process.waiters:
                    process.withdraw(waiter)
                raise _draining()
            process.withdraw(waiter)
            process.settle()  # the queue's head may have changed
        what = "a slot of this client" if process.has_room() else "a database slot"
        raise BusyError(f"waited {self.timeout}s for {what}")

    def leave(self, sid: str | None) -> None:
        """Give back the slot of an event of ``sid`` that ran."""
        process = self.process
        lock = process.lock
        lock.acquire()
        try:
            process.running -= 1
            if self.per_client and sid is not None:
                left = self._clients[sid] - 1
                if left:
                    self._clients[sid] = left
                else:
                    del self._clients[sid]  # per-sid state lives only while it runs
            if process.waiters:
                process.settle()
            elif process.draining and not process.running and process._idle is not None:
                process._idle.set()
        finally:
            lock.release()

    def run(self, sid: str | None, call: Callable[..., Any], *args: Any) -> Any:
        """Run ``call(*args)`` once admitted; raise :class:`BusyError` after the timeout."""
        waiter = self.enter(sid)
        if waiter is not None:
            waiter.event.wait(self.timeout)
            self.admitted(waiter)
        try:
            return call(*args)
        finally:
            self.leave(sid)


def _draining() -> BusyError:
    return BusyError("the server is shutting down", retry_after=DRAIN_RETRY_AFTER)
