"""The public shapes: what the pool, health, metrics, monitor and error acks return.

Each is a :class:`~typing.TypedDict`, so the keys are documented and type-checked;
at run time they are plain dicts, ready for JSON.
"""

from __future__ import annotations

import sys
from typing import Optional, TypedDict

if sys.version_info >= (3, 11):  # pragma: no cover - depends on the interpreter
    from typing import NotRequired
else:  # pragma: no cover
    from typing_extensions import NotRequired

__all__ = [
    "ClusterPayload",
    "ErrorAck",
    "EventSummary",
    "FleetTotals",
    "HealthResult",
    "LeakEntry",
    "MonitorPayload",
    "PoolStatus",
]


class PoolStatus(TypedDict):
    """The pool dict of one engine (``dbctx.pool_status()``, monitor ``pools``)."""

    bind: str
    pool_class: str
    size: Optional[int]
    max_overflow: Optional[int]
    capacity: Optional[int]
    checked_in: int
    checked_out: int
    overflow: int
    utilization: float
    timeout: Optional[float]
    waiting: int
    long_held: int
    status: str


class HealthResult(TypedDict):
    """What ``dbctx.health_check()`` and the monitor's ``health`` answer."""

    healthy: bool
    latency_ms: float
    error: Optional[str]


class EventSummary(TypedDict):
    """Counters and latency percentiles of one ``namespace:event``."""

    count: int
    errors: int
    retries: int
    busy: int
    in_flight: int
    p50_ms: Optional[float]
    p95_ms: Optional[float]
    p99_ms: Optional[float]


class LeakEntry(TypedDict):
    """One connection checked out longer than ``DBCTX_LEAK_THRESHOLD``."""

    age_s: float
    event: Optional[str]
    sid: Optional[str]


class MonitorPayload(TypedDict):
    """One worker's ``pool_status`` push (and ``get_status`` ack)."""

    worker: str
    timestamp: float
    status: str
    pools: dict[str, PoolStatus]
    events: dict[str, EventSummary]
    leaks: list[LeakEntry]


class FleetTotals(TypedDict):
    """The default pools of every worker added up (``cluster_status["totals"]``)."""

    checked_out: int
    capacity: Optional[int]
    utilization: float
    workers: int
    max_connections: NotRequired[Optional[int]]


class ClusterPayload(TypedDict):
    """The ``cluster_status`` push: every worker's payload, shared through Redis."""

    timestamp: float
    status: str
    workers: dict[str, MonitorPayload]
    totals: FleetTotals
    error: NotRequired[str]


class ErrorAck(TypedDict):
    """The ack of a failed event (see :mod:`socketio_dbctx.acks` for the codes)."""

    error: str
    message: str
    retryable: bool
    retry_after_ms: NotRequired[int]
    detail: NotRequired[str]
