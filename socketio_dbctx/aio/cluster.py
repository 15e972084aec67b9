"""The Redis cluster view of an asyncio server: :class:`~socketio_dbctx.cluster.ClusterView`'s
rules (:class:`~socketio_dbctx.cluster.ClusterRules`) on ``redis.asyncio``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable

from ..cluster import ClusterRules

if TYPE_CHECKING:
    from ..shapes import ClusterPayload, MonitorPayload

__all__ = ["AsyncClusterView"]

logger = logging.getLogger(__name__)


class AsyncClusterView(ClusterRules):
    """:class:`ClusterView` for an asyncio server, on ``redis.asyncio``: the same keys,
    expiry, payload and rounds. Call :meth:`start` with a running loop.

    :param redis_url: where the snapshots live.
    :param worker: this worker's id (``host:pid``).
    :param interval: seconds between rounds.
    :param payload: returns this worker's monitor payload.
    :param push: awaited with each ``cluster_status`` payload.
    :param max_connections: awaited once; the database's ``max_connections`` or None.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        worker: str,
        interval: float,
        payload: Callable[[], MonitorPayload],
        push: Callable[[ClusterPayload], Awaitable[Any]],
        max_connections: Callable[[], Awaitable[int | None]],
    ) -> None:
        super().__init__(worker, interval)
        self._redis = self.redis_client(
            "redis.asyncio",
            redis_url,
            "leave cluster_redis_url unset and use no AsyncRedisManager",
        )
        self._payload, self._push, self._max_connections = payload, push, max_connections
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the rounds as a task of the running loop (once)."""
        if self._task is None and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _redis_call(self, what: str, coro: Awaitable[Any]) -> Any:
        try:
            result = await coro
        except Exception as exc:
            self.redis_failed(exc)
            raise
        self.redis_answered(what)
        return result

    async def publish(self, payload: MonitorPayload) -> None:
        """Write this worker's payload, expiring after three intervals."""
        await self._redis_call(
            "publish", self._redis.set(self.key, self.encode(payload), px=self.ttl_ms)
        )

    async def workers(self) -> dict[str, MonitorPayload]:
        """Every live worker's last payload, by ``host:pid``."""

        async def read() -> dict[str, MonitorPayload]:
            keys = sorted(
                [key async for key in self._redis.scan_iter(match=self.MATCH, count=100)]
            )
            return self.decode(await self._redis.mget(keys) if keys else [])

        return await self._redis_call("read", read())  # type: ignore[no-any-return]

    async def payload(self) -> ClusterPayload:
        """The ``cluster_status`` payload (from this worker alone while Redis is away)."""
        try:
            workers: dict[str, MonitorPayload] | None = await self.workers()
        except Exception:
            workers = None
        return self.view(workers, self._payload)

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the loop has ended."""
        return self._task is not None and not self._task.done()

    async def stop(self, timeout: float | None = None) -> bool:
        """End the loop after its current round (this worker leaves the fleet at once);
        wait up to ``timeout`` seconds. True when it has ended."""
        self._stopped = True
        task = self._task
        if task is not None and timeout is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return not self.running

    async def _loop(self) -> None:
        try:
            try:
                self.max_connections = await self._max_connections()
            except Exception:
                logger.warning("cluster view: could not read max_connections", exc_info=True)
            while not self._stopped:
                try:
                    with contextlib.suppress(Exception):
                        await self.publish(self._payload())
                    cluster = await self.payload()
                    self.check_capacity(cluster["totals"])
                    await self._push(cluster)
                except Exception:
                    logger.debug("cluster round failed", exc_info=True)
                deadline = time.monotonic() + self.interval
                while nap := self.nap(deadline):
                    await asyncio.sleep(nap)
            with contextlib.suppress(Exception):
                await self._redis.delete(self.key)
        finally:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
