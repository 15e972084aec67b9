"""Pool statistics: the pool dict (:class:`~socketio_dbctx.shapes.PoolStatus`).

``QueuePool`` counts its own connections; for other pools the number checked out
comes from the :class:`~socketio_dbctx.leaks.PoolTracker`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine
from sqlalchemy.pool import AssertionPool, NullPool, Pool, QueuePool, StaticPool

from .shapes import PoolStatus

if TYPE_CHECKING:
    from .leaks import Checkout

__all__ = ["STATUSES", "pool_capacity", "pool_status", "worst_status"]

#: pool statuses, best first (``worst_status`` picks the last)
STATUSES = ("healthy", "unknown", "warning", "exhausted", "unhealthy", "draining")


def _limits(pool: Pool) -> tuple[int | None, int | None, float | None]:
    if isinstance(pool, QueuePool):
        max_overflow = pool._max_overflow
        return pool.size(), max_overflow, pool.timeout()
    if isinstance(pool, NullPool):
        return 0, -1, None
    return None, None, None  # SingletonThreadPool, StaticPool, ...: no bound to report


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
    unhealthy: bool = False,
    draining: bool = False,
) -> PoolStatus:
    """Describe ``engine``'s pool as a pool dict.

    :param engine: the engine.
    :param bind: its bind name (``"default"`` for the default engine).
    :param checkouts: the tracker's current checkouts of this engine.
    :param warn_utilization: utilization from which the status is ``warning``.
    :param leak_threshold: seconds after which a checkout counts as ``long_held``.
    :param waiting: events waiting for admission or a checkout.
    :param unhealthy: its health probes fail (status ``unhealthy``).
    :param draining: the process drains (status ``draining``, over everything else).
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
    if draining:
        status = "draining"
    elif unhealthy:
        status = "unhealthy"
    elif not reports:
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
        "timeout": float(timeout) if timeout is not None else None,
        "waiting": waiting,
        "long_held": long_held,
        "status": status,
    }


def worst_status(statuses: list[str]) -> str:
    """The worst of several pool statuses (``healthy`` when there are none)."""
    return max(statuses, key=STATUSES.index, default="healthy")
