"""Log lines that do not flood: the first of a kind in full, then one summary per interval.

During an outage every event fails the same way; logging each with its traceback
buried the one line that mattered under a hundred thousand copies. A
:class:`LogThrottle` lets the first occurrence of each key (for failed events:
``(namespace:event, error class)``) through, counts the rest, and lets one summary
through per key and interval: "... and 1523 more like it in the last 10 s". A key
quiet for a whole interval starts over. Exact counts live in the metrics, not here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Callable, NamedTuple

__all__ = ["SUMMARY_INTERVAL", "Decision", "LogThrottle"]

#: Seconds between two summary lines of one kind of failure.
SUMMARY_INTERVAL = 10.0

#: Most kinds followed at once; beyond that, new kinds are let through unthrottled
#: (a client inventing event names must not grow this without bound).
MAX_KEYS = 1000


class Decision(NamedTuple):
    """What to log for one occurrence.

    :ivar log: write a line for it.
    :ivar first: the line is the first of its kind (log it in full).
    :ivar more: for a summary line, how many occurrences it stands for (this one included).
    :ivar seconds: for a summary line, the time they spread over.
    """

    log: bool
    first: bool
    more: int = 0
    seconds: float = 0.0


class _Kind:
    __slots__ = ("since", "suppressed")

    def __init__(self, since: float) -> None:
        self.since = since
        self.suppressed = 0


_SKIP = Decision(False, False)
_FIRST = Decision(True, True)


class LogThrottle:
    """Decides which occurrences of each kind are logged.

    :param interval: seconds between two summaries of one kind.
    :param clock: a monotonic clock (tests pass their own).
    """

    def __init__(
        self, interval: float = SUMMARY_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}
        self._lock = threading.Lock()

    def occurred(self, key: Hashable) -> Decision:
        """Record one occurrence of ``key`` and say whether and how to log it."""
        now = self._clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                if len(self._kinds) >= MAX_KEYS:
                    self._forget(now)
                    if len(self._kinds) >= MAX_KEYS:
                        return _FIRST
                self._kinds[key] = _Kind(now)
                return _FIRST
            elapsed = now - kind.since
            if elapsed < self.interval:
                kind.suppressed += 1
                return _SKIP
            kind.since = now
            if not kind.suppressed:  # quiet for a whole interval: start over
                return _FIRST
            more, kind.suppressed = kind.suppressed + 1, 0
            return Decision(True, False, more, elapsed)

    def pending(self) -> dict[Hashable, int]:
        """Occurrences counted but not yet reported in a summary, by key."""
        with self._lock:
            return {key: kind.suppressed for key, kind in self._kinds.items() if kind.suppressed}

    def _forget(self, now: float) -> None:
        # with the lock held: drop kinds whose interval ended with nothing left to report
        for key in [
            k
            for k, kind in self._kinds.items()
            if not kind.suppressed and now - kind.since >= self.interval
        ]:
            del self._kinds[key]
