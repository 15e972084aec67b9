"""Pool statistics: the pool dict of DESIGN section 5, and a checkout tracker.

The tracker listens to each engine's pool ``checkout``/``checkin`` events, so it
knows how many connections are out for pools that do not count them themselves
(``NullPool``, ``SingletonThreadPool``) and how long each one has been out.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import AssertionPool, NullPool, Pool, QueuePool, StaticPool

__all__ = ["Checkout", "PoolTracker", "pool_capacity", "pool_status", "worst_status"]

_STATUS_ORDER = ("healthy", "unknown", "warning", "exhausted")


@dataclass
class Checkout:
    """One connection currently checked out of a pool."""

    since: float
    label: str | None
    sid: str | None
    stack: str | None = None
    reported: bool = False


@dataclass
class _PoolRecord:
    checkouts: dict[int, Checkout] = field(default_factory=dict)


class PoolTracker:
    """Follows checkouts of the engines it is attached to.

    :param describe: returns ``(label, sid, stack)`` for a checkout happening now.
    """

    def __init__(self, describe: Callable[[], tuple[str | None, str | None, str | None]]) -> None:
        self._describe = describe
        self._records: weakref.WeakKeyDictionary[Pool, _PoolRecord] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def attach(self, engine: Engine) -> None:
        """Start following ``engine``'s pool (once; later calls do nothing)."""
        pool = engine.pool
        with self._lock:
            if pool in self._records:
                return
            record = self._records[pool] = _PoolRecord()
        checkouts = record.checkouts
        describe = self._describe

        def on_checkout(dbapi_conn: Any, rec: Any, proxy: Any) -> None:
            label, sid, stack = describe()
            checkouts[id(rec)] = Checkout(time.monotonic(), label, sid, stack)

        def on_checkin(dbapi_conn: Any, rec: Any) -> None:
            checkouts.pop(id(rec), None)

        event.listen(pool, "checkout", on_checkout)
        event.listen(pool, "checkin", on_checkin)

    def checkouts(self, engine: Engine) -> list[Checkout]:
        """The connections of ``engine`` checked out now (a snapshot)."""
        record = self._records.get(engine.pool)
        return list(record.checkouts.values()) if record else []


def _limits(pool: Pool) -> tuple[int | None, int | None, float | None]:
    if isinstance(pool, QueuePool):
        max_overflow = pool._max_overflow
        return pool.size(), max_overflow, pool.timeout()
    if isinstance(pool, NullPool):
        return 0, -1, None
    size = getattr(pool, "_pool_size", None)  # SingletonThreadPool: one per thread, unbounded
    return size, -1 if size is not None else None, None


def pool_capacity(engine: Engine) -> int | None:
    """``pool_size + max_overflow``, or ``None`` for a pool without a bound."""
    size, max_overflow, _ = _limits(engine.pool)
    if size is None or max_overflow is None or max_overflow < 0:
        return None
    return size + max_overflow


def pool_status(
    engine: Engine,
    bind: str,
    *,
    checkouts: list[Checkout],
    warn_utilization: float,
    leak_threshold: float,
    waiting: int = 0,
) -> dict[str, Any]:
    """Describe ``engine``'s pool as the pool dict of DESIGN section 5.

    :param engine: the engine.
    :param bind: its bind name (``"default"`` for the default engine).
    :param checkouts: the tracker's current checkouts of this engine.
    :param warn_utilization: utilization from which the status is ``warning``.
    :param leak_threshold: seconds after which a checkout counts as ``long_held``.
    :param waiting: events waiting for admission or a checkout.
    """
    pool = engine.pool
    size, max_overflow, timeout = _limits(pool)
    reports = not isinstance(pool, (StaticPool, AssertionPool))
    if isinstance(pool, QueuePool):
        checked_in, checked_out = pool.checkedin(), pool.checkedout()
        overflow = max(0, pool.overflow())
    else:
        checked_out = len(checkouts)
        checked_in = pool.checkedin() if hasattr(pool, "checkedin") else 0
        overflow = 0
    capacity = pool_capacity(engine)
    utilization = round(checked_out / capacity, 4) if capacity else 0.0
    now = time.monotonic()
    long_held = (
        sum(1 for c in checkouts if now - c.since >= leak_threshold) if leak_threshold else 0
    )
    if not reports:
        status = "unknown"
    elif capacity is not None and (utilization >= 1.0 or (waiting and checked_out >= capacity)):
        status = "exhausted"
    elif capacity is not None and utilization >= warn_utilization:
        status = "warning"
    else:
        status = "healthy"
    return {
        "bind": bind,
        "pool_class": type(pool).__name__,
        "size": size,
        "max_overflow": max_overflow,
        "capacity": capacity,
        "checked_in": checked_in,
        "checked_out": checked_out,
        "overflow": overflow,
        "utilization": utilization,
        "timeout": timeout,
        "waiting": waiting,
        "long_held": long_held,
        "status": status,
    }


def worst_status(statuses: list[str]) -> str:
    """The worst of several pool statuses (``healthy`` when there are none)."""
    return max(statuses, key=_STATUS_ORDER.index, default="healthy")
