"""The ``/monitor`` namespace and the cluster view of :class:`AsyncDBContext
<socketio_dbctx.aio.AsyncDBContext>`: the Flask version's events, auth, budgets and
payloads on python-socketio's ``AsyncServer``.

What a subscriber sees is built by the same code as in the Flask version: the
payload by :func:`socketio_dbctx.state.monitor_payload`, the auth check, call
budgets, ``get_status`` scopes and error acks by :mod:`socketio_dbctx.monitor`, the
cluster keys, totals and ``cluster_status`` by :class:`socketio_dbctx.cluster.ClusterRules`
(here through :class:`~socketio_dbctx.aio.cluster.AsyncClusterView`, on ``redis.asyncio``).
Only the I/O is asyncio's: the push loop and the health probes are tasks of the
server's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import socketio

from ..cluster import cluster_redis_url
from ..monitor import (
    CallBudgets,
    MonitorNamespace,
    busy_ack,
    check_auth,
    no_cluster_ack,
    status_scope,
    warn_if_open,
)
from ..shapes import ClusterPayload, ErrorAck, HealthResult, MonitorPayload
from ..state import monitor_payload, worker_id
from .cluster import AsyncClusterView

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .extension import AsyncDBContext

__all__ = ["AsyncMonitorNamespace", "install_monitor"]

logger = logging.getLogger(__name__)


def install_monitor(dbctx: AsyncDBContext) -> AsyncMonitorNamespace | None:
    """Register the monitor namespace on ``dbctx.sio`` when ``monitor_auth`` is set
    (``None``: no monitor, as in the Flask version), with the cluster view when a
    Redis URL is known (``cluster_redis_url``, or an ``AsyncRedisManager``'s)."""
    settings = dbctx.settings
    if settings.monitor_auth is None:
        return None
    warn_if_open(settings.monitor_auth, settings.monitor_namespace)
    monitor = AsyncMonitorNamespace(dbctx, settings.monitor_namespace)
    dbctx.sio.register_namespace(monitor)
    url = cluster_redis_url(settings.cluster_redis_url, dbctx.sio)
    if url is not None:
        monitor.cluster = AsyncClusterView(
            url,
            worker=worker_id(),
            interval=settings.monitor_interval,
            payload=monitor.payload,
            push=lambda payload: monitor.push("cluster_status", payload),
            max_connections=lambda: _max_connections(dbctx.state.maker.kw["bind"]),
        )
        monitor.start_with_server()
    return monitor


async def _max_connections(engine: AsyncEngine) -> int | None:
    if engine.dialect.name != "postgresql":
        return None
    async with engine.connect() as conn:
        return int((await conn.exec_driver_sql("SHOW max_connections")).scalar_one())


class AsyncMonitorNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    """:class:`~socketio_dbctx.MonitorNamespace` for an ``AsyncServer``: on connect
    (auth as ``monitor_auth`` says) one ``pool_status`` at once, then one every
    ``monitor_interval`` while anybody listens; ``get_status`` (optionally
    ``{"scope": "cluster"}``) and ``health`` acked, :attr:`rate` calls per second per
    budget; ``cluster_status`` pushes with the cluster view. Registered by
    ``AsyncDBContext(..., monitor_auth=...)`` as ``dbctx.monitor``.

    :param dbctx: the extension.
    :param namespace: usually ``monitor_namespace``.
    """

    #: calls of ``get_status``/``health`` per second and budget (burst: the same).
    rate = MonitorNamespace.rate
    #: seconds between the health probes the push loop starts while anybody listens.
    probe_every = MonitorNamespace.probe_every

    def __init__(self, dbctx: AsyncDBContext, namespace: str = "/monitor") -> None:
        super().__init__(namespace)
        self.dbctx = dbctx
        #: the cluster view, when there is a Redis
        self.cluster: AsyncClusterView | None = None
        self._subscribers: set[str] = set()
        self._budgets = CallBudgets()
        self._loop_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_started = -math.inf

    def budget_key(self, auth: Any) -> Hashable:
        """The rate-limit budget a client's calls count against (see
        :meth:`MonitorNamespace.budget_key <socketio_dbctx.MonitorNamespace.budget_key>`);
        default: one budget for the process."""
        return None

    # -- what is sent -------------------------------------------------------------------

    def payload(self) -> MonitorPayload:
        """This worker's monitor payload: ``unhealthy`` while its probes fail."""
        pools = self.dbctx.pool_status_all()  # unhealthy while dbctx.health_check() fails
        return monitor_payload(pools, self.dbctx.state.metrics, self.dbctx.state.tracker)

    async def push(self, event: str, payload: Any) -> None:
        """Send ``payload`` to every subscriber connected to this process (never
        through the message queue)."""
        for sid in list(self._subscribers):
            try:
                await self.server.emit(
                    event, payload, to=sid, namespace=self.namespace, ignore_queue=True
                )
            except Exception:
                logger.exception("monitor push of %s to %s failed", event, sid)

    @property
    def subscribers(self) -> int:
        """How many clients of this process are subscribed."""
        return len(self._subscribers)

    @property
    def loop_running(self) -> bool:
        """Whether the push loop of this process is running."""
        return self._loop_task is not None and not self._loop_task.done()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the cluster view's rounds (needs a running loop; done by itself on the
        server's first request). Idempotent."""
        if self.cluster is not None:
            self.cluster.start()

    def start_with_server(self) -> None:
        """Start at once when a loop runs (uvicorn imports the app inside its loop),
        else on the server's first request (``sio.handle_request``)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            self.start()
            return
        sio = self.dbctx.sio
        original = sio.handle_request

        async def handle_request(*args: Any, **kwargs: Any) -> Any:
            sio.__dict__.pop("handle_request", None)  # once is enough
            self.start()
            return await original(*args, **kwargs)

        sio.handle_request = handle_request

    async def stop(self, timeout: float | None = 5.0) -> bool:
        """Stop the cluster view: this worker leaves the fleet at once. For shutdown
        and tests; True when its loop has ended."""
        return await self.cluster.stop(timeout) if self.cluster is not None else True

    async def on_connect(self, sid: str, environ: Any, auth: Any = None) -> bool:
        if not check_auth(self.dbctx.settings.monitor_auth, auth):
            logger.warning("monitor connection refused for sid %s", sid)
            return False
        self.start()
        self._budgets.join(sid, self.budget_key(auth))
        first = self.payload()  # before subscribing: if this fails, nobody is left behind
        self._subscribers.add(sid)
        await self.server.emit(
            "pool_status", first, to=sid, namespace=self.namespace, ignore_queue=True
        )
        if not self.loop_running:
            self._loop_task = asyncio.get_running_loop().create_task(
                self._loop(self.dbctx.settings.monitor_interval)
            )
        return True

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        self._subscribers.discard(sid)
        self._budgets.leave(sid)  # the budget stays: reconnecting must not refill it

    async def _loop(self, interval: float) -> None:
        """Push a snapshot to every local subscriber each interval; end with the last."""
        while True:
            await asyncio.sleep(interval)
            if not self._subscribers:
                return
            try:
                self._probe()
                await self.push("pool_status", self.payload())
            except Exception:
                logger.exception("monitor push failed")

    def _probe(self) -> None:
        # while somebody watches, the status follows the database: a probe every
        # probe_every seconds, not waited for; its result shows in a later push
        now = time.monotonic()
        if self._probe_task is not None or now - self._probe_started < self.probe_every:
            return
        self._probe_started = now

        async def probe() -> None:
            try:
                await self.dbctx.health_check(2.0)  # it records the result
            finally:
                self._probe_task = None

        self._probe_task = asyncio.get_running_loop().create_task(probe())

    # -- client events ------------------------------------------------------------------

    async def on_get_status(
        self, sid: str, data: Any = None
    ) -> MonitorPayload | ClusterPayload | ErrorAck:
        if not self._budgets.allow(sid, self.rate):
            return busy_ack()
        scope = status_scope(data)
        if scope == "cluster":
            if self.cluster is None:
                return no_cluster_ack()
            return await self.cluster.payload()
        if scope != "local":
            return scope
        return self.payload()

    async def on_health(self, sid: str, data: Any = None) -> HealthResult | ErrorAck:
        if not self._budgets.allow(sid, self.rate):
            return busy_ack()
        return await self.dbctx.health_check(2.0)
