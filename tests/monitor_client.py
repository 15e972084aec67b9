"""A real python-socketio client of ``/monitor`` that records every push.

One helper for every test that talks to the monitor of a real server
(``test_monitor.py``, ``test_cluster.py``, ``test_sample_workers.py``,
``test_sample_load.py``): it records each ``pool_status`` and ``cluster_status`` with
its arrival time, waits for pushes with a deadline (failing with the server's log),
and calls ``get_status`` or ``health`` through the monitor's rate limit.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, NamedTuple

import pytest
import socketio

__all__ = [
    "CLUSTER_STATUS",
    "MONITOR",
    "POOL_STATUS",
    "RATE",
    "MonitorClient",
    "Received",
    "is_busy",
]

MONITOR = "/monitor"
POOL_STATUS = "pool_status"
CLUSTER_STATUS = "cluster_status"
#: MonitorNamespace.rate: get_status/health calls per second and client; a ``busy``
#: ack is retried after one token's refill time.
RATE = 5.0


class Received(NamedTuple):
    """One push, as the client got it."""

    at: float  # time.monotonic() on arrival
    event: str
    data: dict[str, Any]


def is_busy(ack: Any) -> bool:
    """True for the ack of the monitor's rate limit."""
    return isinstance(ack, dict) and ack.get("error") == "busy"


def _summary(payload: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a payload that say what went wrong, for a failure message."""
    if payload is None:
        return None
    summary = {k: payload[k] for k in ("worker", "status", "totals", "error") if k in payload}
    if "workers" in payload:
        summary["workers"] = sorted(payload["workers"])
    return summary


class MonitorClient:
    """A ``/monitor`` client recording every ``pool_status`` and ``cluster_status``.

    :param describe: names the server in failure messages.
    :param log: returns the server's log, appended to failure messages.
    """

    def __init__(self, describe: str = "the server", log: Callable[[], str] | None = None):
        self.describe = describe
        self.log = log or (lambda: "")
        self.client = socketio.Client(reconnection=False)
        self._lock = threading.Lock()
        self._received: list[Received] = []
        for event in (POOL_STATUS, CLUSTER_STATUS):
            self.client.on(event, self._recorder(event), namespace=MONITOR)

    def _recorder(self, event: str) -> Callable[[dict[str, Any]], None]:
        def record(data: dict[str, Any]) -> None:
            with self._lock:
                self._received.append(Received(time.monotonic(), event, data))

        return record

    def connect(self, url: str, auth: Any = None, wait_timeout: float = 10) -> MonitorClient:
        """Connect over WebSocket; raises ``socketio.exceptions.ConnectionError`` when
        the monitor refuses."""
        self.client.connect(
            url,
            namespaces=[MONITOR],
            transports=["websocket"],
            auth=auth,
            wait_timeout=wait_timeout,
        )
        return self

    @property
    def sid(self) -> str:
        return str(self.client.get_sid(MONITOR))

    # -- what arrived -------------------------------------------------------------------

    def mark(self) -> int:
        """A position in the record, for :meth:`since` and the waits."""
        with self._lock:
            return len(self._received)

    def since(self, mark: int = 0, event: str | None = None) -> list[Received]:
        """What arrived after ``mark`` (of ``event``, or of any)."""
        with self._lock:
            return [r for r in self._received[mark:] if event is None or r.event == event]

    def pushes(self, event: str = POOL_STATUS) -> list[dict[str, Any]]:
        """Every ``event`` payload so far."""
        return [r.data for r in self.since(0, event)]

    def wait(
        self,
        event: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        message: str,
        since: int = 0,
    ) -> Received:
        """The first ``event`` after ``since`` whose payload satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.since(since, event)
            for item in seen:
                if predicate(item.data):
                    return item
            if time.monotonic() >= deadline:
                self._fail(timeout, message, event, seen)
            time.sleep(0.05)

    def wait_pushes(
        self, count: int, timeout: float = 10.0, event: str = POOL_STATUS, since: int = 0
    ) -> list[Received]:
        """The first ``count`` ``event`` pushes after ``since``, once they are there."""
        deadline = time.monotonic() + timeout
        while len(seen := self.since(since, event)) < count:
            if time.monotonic() >= deadline:
                self._fail(timeout, f"{count} {event} pushes", event, seen)
            time.sleep(0.05)
        return seen[:count]

    def _fail(self, timeout: float, message: str, event: str, seen: list[Received]) -> None:
        last = _summary(seen[-1].data) if seen else None
        pytest.fail(
            f"timed out after {timeout}s on {self.describe}: {message}; {len(seen)} {event} "
            f"received, the last: {last}\n--- server log ---\n" + self.log()[-4000:]
        )

    # -- calls ----------------------------------------------------------------------------

    def call(self, event: str, *args: Any, timeout: float = 30.0) -> Any:
        """Call ``event``; a ``busy`` ack (the monitor's rate limit) is retried after a
        token's refill time, for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            ack = self.call_once(event, *args, timeout=timeout)
            if not is_busy(ack) or time.monotonic() >= deadline:
                return ack
            time.sleep(1.0 / RATE)

    def call_once(self, event: str, *args: Any, timeout: float = 10.0) -> Any:
        """Call ``event`` once, ``busy`` or not."""
        return self.client.call(event, *args, namespace=MONITOR, timeout=timeout)
