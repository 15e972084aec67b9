"""Admission control: bound concurrent events per client and per process.

An event first takes a slot of its own client (sid), then one of the process, so a
client flooding events queues behind itself instead of taking every pooled
connection. A wait longer than ``DBCTX_QUEUE_TIMEOUT`` ends in :class:`BusyError`.
The semaphores are the async mode's own, so waiting never blocks a whole process
under eventlet or gevent. The pipeline step that uses this lives in
:mod:`socketio_dbctx.middleware`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .errors import BusyError

__all__ = ["Admission", "ProcessLimit", "semaphore_factory"]

Semaphore = Any

# Released per-client semaphores kept for reuse (bounded: idle clients cost nothing).
_SPARE_MAX = 256


def semaphore_factory(async_mode: str | None) -> Callable[[int], Semaphore]:
    """The bounded-semaphore class of an async mode."""
    if async_mode == "eventlet":
        from eventlet.semaphore import BoundedSemaphore as EventletSemaphore

        return EventletSemaphore  # type: ignore[no-any-return]
    if async_mode == "gevent":
        from gevent.lock import BoundedSemaphore as GeventSemaphore

        return GeventSemaphore  # type: ignore[no-any-return]
    return threading.BoundedSemaphore


class _Client:
    __slots__ = ("semaphore", "users")

    def __init__(self, semaphore: Semaphore) -> None:
        self.semaphore = semaphore
        self.users = 0


class ProcessLimit:
    """The process-wide slot count of one app, shared by all its namespaces.

    :param async_mode: ``"threading"``, ``"eventlet"`` or ``"gevent"``.
    :param limit: events at once in this process; ``None`` or 0 = no limit.
    """

    def __init__(self, async_mode: str | None, limit: int | None) -> None:
        self.make = semaphore_factory(async_mode)
        self.limit = limit or None
        self.semaphore = self.make(self.limit) if self.limit else None
        self._lock = threading.Lock()
        self.waiting = 0

    def wait(self, semaphore: Semaphore, deadline: float, what: str, timeout: float) -> None:
        """Take a slot of ``semaphore`` before ``deadline`` or raise BusyError."""
        if semaphore.acquire(blocking=False):
            return
        with self._lock:
            self.waiting += 1
        try:
            left = max(0.0, deadline - time.monotonic())
            if not semaphore.acquire(blocking=True, timeout=left):
                raise BusyError(f"waited {timeout}s for {what}")
        finally:
            with self._lock:
                self.waiting -= 1


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
        self._clients: dict[str, _Client] = {}
        self._spare: list[Semaphore] = []
        self._lock = threading.Lock()

    @property
    def unlimited(self) -> bool:
        """True when neither a process nor a per-client limit applies."""
        return self.process.semaphore is None and not self.per_client

    def run(self, sid: str | None, call: Callable[[], Any]) -> Any:
        """Run ``call`` once admitted; raise :class:`BusyError` after the timeout."""
        process = self.process
        if self.unlimited:
            return call()
        deadline = time.monotonic() + self.timeout
        client = self._enter_client(sid) if self.per_client and sid is not None else None
        try:
            if client is not None:
                process.wait(client.semaphore, deadline, "a slot of this client", self.timeout)
            try:
                if process.semaphore is not None:
                    process.wait(process.semaphore, deadline, "a database slot", self.timeout)
                try:
                    return call()
                finally:
                    if process.semaphore is not None:
                        process.semaphore.release()
            finally:
                if client is not None:
                    client.semaphore.release()
        finally:
            if client is not None:
                self._leave_client(client, sid)  # type: ignore[arg-type]

    def _enter_client(self, sid: str) -> _Client:
        with self._lock:
            client = self._clients.get(sid)
            if client is None:
                # a released semaphore from the spare list saves building one per event
                semaphore = (
                    self._spare.pop() if self._spare else self.process.make(self.per_client)
                )
                client = self._clients[sid] = _Client(semaphore)
            client.users += 1
            return client

    def _leave_client(self, client: _Client, sid: str) -> None:
        # per-sid state lives only while the sid has events running or waiting
        with self._lock:
            client.users -= 1
            if client.users == 0:
                self._clients.pop(sid, None)
                if len(self._spare) < _SPARE_MAX:
                    self._spare.append(client.semaphore)  # every slot is free again
