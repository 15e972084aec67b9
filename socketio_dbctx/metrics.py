"""Per-event counters and latency percentiles over a sliding window.

Recording is O(1) and memory is bounded: each event name keeps its last
:data:`WINDOW` durations; percentiles are computed when somebody reads them.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

__all__ = ["WINDOW", "EventMetrics"]

#: Durations kept per event name for the percentiles.
WINDOW = 1024


class _Stats:
    __slots__ = ("busy", "count", "durations", "errors", "in_flight", "retries")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.retries = 0
        self.busy = 0
        self.in_flight = 0
        self.durations: deque[float] = deque(maxlen=WINDOW)


def _percentile(ordered: list[float], q: float) -> float:
    # nearest-rank on the sorted window
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return round(ordered[index] * 1000.0, 3)


class EventMetrics:
    """Counters per ``"namespace:event"`` key, safe to update from many threads."""

    def __init__(self) -> None:
        self._stats: dict[str, _Stats] = {}
        self._lock = threading.Lock()
        self.retries_total = 0

    def _get(self, key: str) -> _Stats:
        stats = self._stats.get(key)
        if stats is None:
            with self._lock:
                stats = self._stats.setdefault(key, _Stats())
        return stats

    def started(self, key: str) -> None:
        """An event began running."""
        stats = self._get(key)
        with self._lock:
            stats.in_flight += 1

    def finished(self, key: str, seconds: float, outcome: str) -> None:
        """An event ended.

        :param outcome: ``"ok"``, ``"error"`` or ``"busy"``.
        """
        stats = self._get(key)
        with self._lock:
            stats.in_flight -= 1
            stats.count += 1
            if outcome == "busy":
                stats.busy += 1
            elif outcome != "ok":
                stats.errors += 1
            stats.durations.append(seconds)

    def retried(self, key: str) -> None:
        """An event is about to run again after a transient failure."""
        stats = self._get(key)
        with self._lock:
            stats.retries += 1
            self.retries_total += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The ``events`` mapping of the monitor payload."""
        with self._lock:
            items = [
                (key, s.count, s.errors, s.retries, s.busy, s.in_flight, list(s.durations))
                for key, s in self._stats.items()
            ]
        result: dict[str, dict[str, Any]] = {}
        for key, count, errors, retries, busy, in_flight, durations in items:
            durations.sort()
            result[key] = {
                "count": count,
                "errors": errors,
                "retries": retries,
                "busy": busy,
                "in_flight": in_flight,
                "p50_ms": _percentile(durations, 0.50) if durations else None,
                "p95_ms": _percentile(durations, 0.95) if durations else None,
                "p99_ms": _percentile(durations, 0.99) if durations else None,
            }
        return result
