"""Per-event counters, latency percentiles over a sliding window, and a histogram.

Recording is O(1) and memory is bounded: each event keeps its last :data:`WINDOW`
durations for the percentiles (computed when somebody reads them) and cumulative
counts over fixed :data:`BUCKETS` for Prometheus.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque

from .shapes import EventSummary

__all__ = ["BUCKETS", "WINDOW", "EventMetrics", "EventStats"]

#: Durations kept per event for the percentiles.
WINDOW = 1024

#: Upper bounds (seconds) of the duration histogram, as Prometheus' defaults.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class EventStats:
    """Counters of one ``namespace:event``."""

    __slots__ = (
        "buckets",
        "busy",
        "count",
        "durations",
        "errors",
        "event",
        "in_flight",
        "namespace",
        "retries",
        "total_seconds",
    )

    def __init__(self, namespace: str, event: str) -> None:
        self.namespace = namespace
        self.event = event
        self.count = 0
        self.errors = 0
        self.retries = 0
        self.busy = 0
        self.in_flight = 0
        self.total_seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)  # last one: +Inf
        self.durations: deque[float] = deque(maxlen=WINDOW)

    def copy(self) -> EventStats:
        clone = EventStats(self.namespace, self.event)
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(clone, name, list(value) if isinstance(value, (list, deque)) else value)
        return clone


def _percentile(ordered: list[float], q: float) -> float:
    # nearest rank on the sorted window
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return round(ordered[index] * 1000.0, 3)


class EventMetrics:
    """Counters per ``"namespace:event"`` key, safe to update from many threads."""

    def __init__(self) -> None:
        self._stats: dict[str, EventStats] = {}
        self._lock = threading.Lock()
        self.retries_total = 0
        self.pool_timeouts = 0
        #: held emits and after-commit callbacks that failed after their commit
        self.after_commit_failures = 0

    def _get(self, key: str, namespace: str, event: str) -> EventStats:
        stats = self._stats.get(key)
        if stats is None:
            with self._lock:
                stats = self._stats.setdefault(key, EventStats(namespace, event))
        return stats

    def started(self, key: str, namespace: str, event: str) -> None:
        """An event began running."""
        stats = self._stats.get(key) or self._get(key, namespace, event)
        # acquire()/release() rather than ``with``, here and in finished(): ``with``
        # makes two bound methods each time, and these run for every event
        lock = self._lock
        lock.acquire()
        try:
            stats.in_flight += 1
        finally:
            lock.release()

    def finished(self, key: str, seconds: float, outcome: str) -> None:
        """An event ended.

        :param outcome: ``"ok"``, ``"error"`` or ``"busy"``.
        """
        stats = self._stats[key]
        slot = bisect.bisect_left(BUCKETS, seconds)
        lock = self._lock
        lock.acquire()
        try:
            stats.in_flight -= 1
            stats.count += 1
            if outcome == "busy":
                stats.busy += 1
            elif outcome != "ok":
                stats.errors += 1
            stats.durations.append(seconds)
            stats.total_seconds += seconds
            stats.buckets[slot] += 1
        finally:
            lock.release()

    def retried(self, key: str) -> None:
        """An event is about to run again after a transient failure."""
        stats = self._stats[key]
        with self._lock:
            stats.retries += 1
            self.retries_total += 1

    def pool_timeout(self) -> None:
        """A pool checkout timed out inside an event."""
        with self._lock:
            self.pool_timeouts += 1

    def after_commit_failed(self) -> None:
        """A held emit or after-commit callback failed after its scope committed."""
        with self._lock:
            self.after_commit_failures += 1

    def stats(self) -> list[EventStats]:
        """Consistent copies of every event's counters."""
        with self._lock:
            return [s.copy() for s in self._stats.values()]

    def snapshot(self) -> dict[str, EventSummary]:
        """The ``events`` mapping of the monitor payload."""
        result: dict[str, EventSummary] = {}
        for s in self.stats():
            durations = sorted(s.durations)
            result[f"{s.namespace}:{s.event}"] = {
                "count": s.count,
                "errors": s.errors,
                "retries": s.retries,
                "busy": s.busy,
                "in_flight": s.in_flight,
                "p50_ms": _percentile(durations, 0.50) if durations else None,
                "p95_ms": _percentile(durations, 0.95) if durations else None,
                "p99_ms": _percentile(durations, 0.99) if durations else None,
            }
        return result
