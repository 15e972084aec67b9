"""The cluster view: every worker's monitor payload, shared through Redis.

Each worker writes its payload to ``socketio_dbctx:worker:<host:pid>`` every
``DBCTX_MONITOR_INTERVAL`` seconds, expiring after three intervals, so a dead
worker drops out on its own. Each worker reads all the keys to build
``cluster_status`` and pushes it to its own ``/monitor`` subscribers only. Redis
being away is logged once and survived: local monitoring goes on and the cluster
view comes back with Redis.

:class:`ClusterRules` is everything but the I/O: the key layout, the expiry, the
payload and totals, the capacity warning, Redis-away logging. :class:`ClusterView`
(sync ``redis``, the Flask stack) and
:class:`~socketio_dbctx.aio.cluster.AsyncClusterView` (``redis.asyncio``) only read and
write.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import text

from .errors import ContextSetupError
from .pool import worst_status
from .shapes import ClusterPayload, FleetTotals, MonitorPayload

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = [
    "KEY_PREFIX",
    "ClusterRules",
    "ClusterView",
    "cluster_redis_url",
    "fleet_totals",
]

logger = logging.getLogger(__name__)

KEY_PREFIX = "socketio_dbctx:"


def cluster_redis_url(configured: str | None, socketio: Any) -> str | None:
    """``DBCTX_CLUSTER_REDIS_URL``, else the Socket.IO message queue's URL when it is Redis
    (``socketio``: Flask-SocketIO's ``SocketIO``, or python-socketio's ``AsyncServer``
    with an ``AsyncRedisManager``)."""
    if configured:
        return configured
    server = getattr(socketio, "server", None) or socketio
    manager = getattr(server, "manager", None)
    url = getattr(manager, "redis_url", None)
    if isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://")):
        return url
    return None


def fleet_totals(workers: Mapping[str, Mapping[str, Any]]) -> FleetTotals:
    """Add up the default pools of every worker."""
    checked_out = capacity = 0
    bounded = True
    for payload in workers.values():
        pool = payload.get("pools", {}).get("default", {})
        checked_out += int(pool.get("checked_out") or 0)
        if pool.get("capacity") is None:
            bounded = False
        else:
            capacity += int(pool["capacity"])
    return {
        "checked_out": checked_out,
        "capacity": capacity if bounded else None,
        "utilization": round(checked_out / capacity, 4) if bounded and capacity else 0.0,
        "workers": len(workers),
    }


class ClusterRules:
    """What both cluster views share: the key layout, the expiry, payload and totals,
    the capacity warning and the logging of Redis going away and coming back.

    :param worker: this worker's id (``host:pid``).
    :param interval: seconds between rounds (``DBCTX_MONITOR_INTERVAL``).
    """

    #: the pattern of every worker's key
    MATCH = f"{KEY_PREFIX}worker:*"

    def __init__(self, worker: str, interval: float) -> None:
        self.interval = interval
        self.worker = worker
        self.key = f"{KEY_PREFIX}worker:{worker}"
        self.max_connections: int | None = None
        #: a worker's key expires after three intervals: a dead worker drops out
        self.ttl_ms = max(1, math.ceil(interval * 3 * 1000))
        #: Redis socket timeouts: never longer than a round
        self.redis_timeout = max(0.5, min(2.0, interval))
        self._redis_down = False
        self._warned_capacity = False
        self._stopped = False

    @staticmethod
    def encode(payload: MonitorPayload) -> str:
        """A payload as stored in Redis."""
        return json.dumps(payload, default=str)

    @staticmethod
    def decode(values: list[Any]) -> dict[str, MonitorPayload]:
        """Stored payloads (``None`` for a key that expired meanwhile), by worker."""
        found: dict[str, MonitorPayload] = {}
        for value in values:
            if value is not None:
                payload = json.loads(value)
                found[str(payload.get("worker"))] = payload
        return found

    def redis_client(self, module: str, redis_url: str, without: str) -> Any:
        """A ``Redis`` client of ``module`` (``"redis"`` or ``"redis.asyncio"``) for
        ``redis_url``, its socket timeouts :attr:`redis_timeout`.

        :param without: how to do without a cluster view, for the error message.
        :raises ContextSetupError: when the redis package is not installed.
        """
        try:
            client_module = importlib.import_module(module)
        except ImportError as exc:
            raise ContextSetupError(
                "the cluster view needs the redis package: pip install 'socketio-dbctx[redis]', "
                f"or {without}"
            ) from exc
        timeout = self.redis_timeout
        return client_module.Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def redis_failed(self, exc: BaseException) -> None:
        """Log the first failure of a run of them."""
        if not self._redis_down:
            self._redis_down = True
            logger.warning(
                "cluster view: Redis unavailable (%s: %s); local monitoring goes on",
                type(exc).__name__,
                exc,
            )

    def redis_answered(self, what: str) -> None:
        """Log Redis coming back."""
        if self._redis_down:
            self._redis_down = False
            logger.info("cluster view: Redis is back (%s)", what)

    def view(
        self, workers: dict[str, MonitorPayload] | None, own: Callable[[], MonitorPayload]
    ) -> ClusterPayload:
        """The ``cluster_status`` payload from the workers read (``None``: Redis is
        away, and the view is this worker's alone, from ``own``)."""
        error = None
        if workers is None:
            workers = {self.worker: own()}
            error = "redis unavailable: showing this worker only"
        totals = fleet_totals(workers)
        totals["max_connections"] = self.max_connections
        status = worst_status([str(w.get("status", "unknown")) for w in workers.values()])
        result: ClusterPayload = {
            "timestamp": time.time(),
            "status": "unknown" if error else status,
            "workers": workers,
            "totals": totals,
        }
        if error:
            result["error"] = error
        return result

    def check_capacity(self, totals: FleetTotals) -> None:
        """Warn once when the fleet's pools can open more connections than the server
        allows."""
        capacity, limit = totals.get("capacity"), self.max_connections
        if limit is None or capacity is None or self._warned_capacity:
            return
        if capacity > limit:
            self._warned_capacity = True
            logger.warning(
                "%d workers x their pool capacity = %d connections, more than PostgreSQL's "
                "max_connections = %d: the fleet can exhaust the server; lower pool_size/"
                "max_overflow or raise max_connections",
                totals["workers"],
                capacity,
                limit,
            )

    def nap(self, deadline: float) -> float:
        """How long to sleep now on the way to ``deadline``: short naps, so a stop does
        not wait a whole interval; 0 when the round is due or the view stopped."""
        if self._stopped:
            return 0.0
        return min(0.25, max(0.0, deadline - time.monotonic()))


class ClusterView(ClusterRules):
    """Publishes this worker's payload and reads everybody's, every ``interval``.

    It knows nothing of the monitor: it is given callables.

    :param redis_url: where the snapshots live.
    :param worker: this worker's id (``host:pid``).
    :param interval: seconds between rounds (``DBCTX_MONITOR_INTERVAL``).
    :param payload: returns this worker's monitor payload.
    :param push: receives each ``cluster_status`` payload (for local subscribers).
    :param engine: returns the default engine, to read ``max_connections``.
    :param spawn: starts a background task in the async mode.
    :param sleep: sleeps in the async mode.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        worker: str,
        interval: float,
        payload: Callable[[], MonitorPayload],
        push: Callable[[ClusterPayload], Any],
        engine: Callable[[], Engine | None],
        spawn: Callable[[Callable[[], None]], Any],
        sleep: Callable[[float], Any],
    ) -> None:
        super().__init__(worker, interval)
        self._redis = self.redis_client(
            "redis",
            redis_url,
            "leave DBCTX_CLUSTER_REDIS_URL unset and use no Redis message queue",
        )
        self._payload, self._push, self._engine = payload, push, engine
        self._sleep = sleep
        self._ended = threading.Event()
        spawn(self._loop)

    # -- redis ----------------------------------------------------------------------

    def _redis_call(self, what: str, func: Callable[[], Any]) -> Any:
        try:
            result = func()
        except Exception as exc:
            self.redis_failed(exc)
            raise
        self.redis_answered(what)
        return result

    def publish(self, payload: MonitorPayload) -> None:
        """Write this worker's payload, expiring after three intervals."""
        data = self.encode(payload)
        self._redis_call("publish", lambda: self._redis.set(self.key, data, px=self.ttl_ms))

    def workers(self) -> dict[str, MonitorPayload]:
        """Every live worker's last payload, by ``host:pid``."""

        def read() -> dict[str, MonitorPayload]:
            keys = sorted(self._redis.scan_iter(match=self.MATCH, count=100))
            return self.decode(self._redis.mget(keys) if keys else [])

        return self._redis_call("read", read)  # type: ignore[no-any-return]

    def payload(self) -> ClusterPayload:
        """The ``cluster_status`` payload (from this worker alone while Redis is away)."""
        try:
            workers: dict[str, MonitorPayload] | None = self.workers()
        except Exception:
            workers = None
        return self.view(workers, self._payload)

    # -- loop -----------------------------------------------------------------------

    def _read_max_connections(self) -> None:
        try:
            engine = self._engine()
            if engine is None or engine.dialect.name != "postgresql":
                return
            with engine.connect() as conn:
                self.max_connections = int(conn.execute(text("SHOW max_connections")).scalar_one())
        except Exception:
            logger.warning("cluster view: could not read max_connections", exc_info=True)

    @property
    def running(self) -> bool:
        """True until the loop has ended."""
        return not self._ended.is_set()

    def stop(self, timeout: float | None = None) -> bool:
        """End the loop after its current round; wait up to ``timeout`` seconds.

        :returns: True when the loop has ended.
        """
        self._stopped = True
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while self.running and time.monotonic() < deadline:
                self._sleep(0.05)
        return not self.running

    def _loop(self) -> None:
        try:
            self._read_max_connections()
            while not self._stopped:
                try:
                    # a failed publish is logged once by _redis_call; subscribers still
                    # get a view
                    with contextlib.suppress(Exception):
                        self.publish(self._payload())
                    cluster = self.payload()
                    self.check_capacity(cluster["totals"])
                    self._push(cluster)
                except Exception:
                    logger.debug("cluster round failed", exc_info=True)
                deadline = time.monotonic() + self.interval
                while nap := self.nap(deadline):
                    self._sleep(nap)
            with contextlib.suppress(Exception):
                self._redis.delete(self.key)  # leave the fleet at once, not after 3 intervals
        finally:
            self._ended.set()
