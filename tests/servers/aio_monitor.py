"""An asyncio test server for the monitor: python-socketio's ``AsyncServer`` under
uvicorn with ``AsyncDBContext`` over asyncpg, its ``/monitor`` namespace, a Prometheus
collector and, optionally, the Redis cluster view
(``uvicorn tests.servers.aio_monitor:app``).

Configured by the environment: ``AIO_DATABASE_URL`` (a ``postgresql+asyncpg://`` URL),
``AIO_POOL`` (``size,overflow,timeout``), ``AIO_OPTIONS`` (JSON: ``AsyncDBContext``
keyword options, e.g. ``monitor_auth``, ``monitor_interval``, ``cluster_redis_url``) and
``AIO_REDIS_MANAGER`` (a Redis URL: the server gets an ``AsyncRedisManager`` on it).

Namespace ``/a`` (an ``AsyncDBContextNamespace``): ``hold(seconds)`` holds a pooled
connection for ``seconds`` (``pg_sleep``); ``ping()`` runs ``SELECT 1``.

HTTP: ``GET /state`` -> ``{"worker", "pool", "monitor", "subscribers",
"loop_running", "cluster"}``;
``GET /metrics`` -> the Prometheus text of this server's own registry; ``GET /stop`` ->
stops the cluster view (``{"stopped": bool}``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import socketio
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from socketio_dbctx.aio import AsyncDBContext, AsyncDBContextNamespace
from socketio_dbctx.prometheus import register
from socketio_dbctx.state import worker_id

size, overflow, pool_timeout = (os.environ.get("AIO_POOL") or "5,0,30").split(",")
engine = create_async_engine(
    os.environ["AIO_DATABASE_URL"],
    pool_size=int(size),
    max_overflow=int(overflow),
    pool_timeout=float(pool_timeout),
)
manager_url = os.environ.get("AIO_REDIS_MANAGER")
sio = socketio.AsyncServer(
    async_mode="asgi",
    client_manager=socketio.AsyncRedisManager(manager_url) if manager_url else None,
)
dbctx = AsyncDBContext(
    sio, async_sessionmaker(engine), **json.loads(os.environ.get("AIO_OPTIONS") or "{}")
)
registry = CollectorRegistry()
register(dbctx, registry=registry)


class Work(AsyncDBContextNamespace):
    async def on_hold(self, sid: str, seconds: float) -> str:
        await self.db_session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
        return "held"

    async def on_ping(self, sid: str) -> int:
        return int((await self.db_session.execute(sa.text("SELECT 1"))).scalar_one())


sio.register_namespace(Work("/a"))


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``GET /state``, ``GET /metrics`` and ``GET /stop``."""
    content_type = b"application/json"
    if scope["path"] == "/metrics":
        data = generate_latest(registry)
        content_type = b"text/plain; version=0.0.4"
    else:
        if scope["path"] == "/stop":
            body: Any = {"stopped": await dbctx.monitor.stop(5) if dbctx.monitor else True}
        else:
            monitor = dbctx.monitor
            body = {
                "worker": worker_id(),
                "pool": dbctx.pool_status(),
                "monitor": monitor is not None,
                "subscribers": monitor.subscribers if monitor else 0,
                "loop_running": monitor.loop_running if monitor else False,
                "cluster": monitor is not None and monitor.cluster is not None,
            }
        data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", content_type)],
        }
    )
    await send({"type": "http.response.body", "body": data})


app = socketio.ASGIApp(sio, other_asgi_app=http)
