"""The asyncio benchmarks' server: python-socketio's ``AsyncServer`` with a plain
``socketio.AsyncNamespace`` and an ``AsyncDBContextNamespace`` whose handlers do the same
work, each side on an ``AsyncEngine`` of its own (so the plain side carries none of
socketio_dbctx's pool listeners). Served by ``uvicorn benchmarks.aio_app:app`` or imported
and driven in-process (``benchmarks/aio_overhead.py``).

Configured by the environment: ``AIO_BENCH_URL`` (a ``postgresql+asyncpg://`` URL),
``AIO_BENCH_SCHEMA`` (its search path, holding ``bench_items`` with row 1),
``AIO_BENCH_POOL`` (``size,overflow,timeout``, default ``5,0,30``) and
``AIO_BENCH_SIDE`` (``ours`` or ``plain``: that side also serves ``/l``, the namespace
``benchmarks/_harness.py``'s clients use) and ``AIO_BENCH_OPTIONS`` (JSON: keyword options of
``AsyncDBContext``, for experiments; the benchmarks use the defaults).

Namespaces ``/plain`` and ``/ours``, the same handlers:

* ``noop()``: ``return 1``;
* ``pk()``: the ``bench_items`` row 1 by primary key, as ``{"id", "name"}``; the plain
  handler opens ``async with AsyncSession(engine)`` itself and does not commit (what
  users write for a read), ``pk_commit()`` is the plain one that commits too;
* ``pg_sleep(seconds)``: ``SELECT pg_sleep(seconds)`` and a commit; acks ``True``. The
  plain handler catches its failures and acks ``{"error": "pool_timeout"}`` (a pool
  checkout that timed out) or ``{"error": "internal_error"}``, so its clients go on
  (an uncaught exception in a plain handler sends no ack at all).

HTTP ``GET /state`` -> ``{"peak": {side: peak checked_out}, "checked_out": {side: n},
"pool_timeouts": {side: n}}``; ``GET /reset`` zeroes the peaks and counters.
"""

from __future__ import annotations

import json
import os
from typing import Any

import socketio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from socketio_dbctx.aio import AsyncDBContext, AsyncDBContextNamespace

size, overflow, pool_timeout = (os.environ.get("AIO_BENCH_POOL") or "5,0,30").split(",")


def create_engine() -> AsyncEngine:
    return _create(
        os.environ["AIO_BENCH_URL"],
        pool_size=int(size),
        max_overflow=int(overflow),
        pool_timeout=float(pool_timeout),
        connect_args={
            "server_settings": {"search_path": os.environ.get("AIO_BENCH_SCHEMA", "public")}
        },
    )


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


SLEEP = sa.text("SELECT pg_sleep(:s)")

plain_engine = create_engine()
ours_engine = create_engine()
ENGINES = {"plain": plain_engine, "ours": ours_engine}
peak = {"plain": 0, "ours": 0}
pool_timeouts = {"plain": 0, "ours": 0}


def _track(side: str, engine: AsyncEngine) -> None:
    pool = engine.sync_engine.pool

    def checked_out(*_: Any) -> None:
        peak[side] = max(peak[side], pool.checkedout())  # type: ignore[attr-defined]

    sa.event.listen(engine.sync_engine, "checkout", checked_out)


for _side, _engine in ENGINES.items():
    _track(_side, _engine)

sio = socketio.AsyncServer(async_mode="asgi")
dbctx = AsyncDBContext(
    sio, async_sessionmaker(ours_engine), **json.loads(os.environ.get("AIO_BENCH_OPTIONS") or "{}")
)


class Plain(socketio.AsyncNamespace):
    async def on_noop(self, sid: str) -> int:
        return 1

    async def on_pk(self, sid: str) -> dict[str, Any]:
        async with AsyncSession(plain_engine) as session:
            item = await session.get(Item, 1)
            assert item is not None
            return {"id": item.id, "name": item.name}

    async def on_pk_commit(self, sid: str) -> dict[str, Any]:
        async with AsyncSession(plain_engine) as session:
            item = await session.get(Item, 1)
            assert item is not None
            answer = {"id": item.id, "name": item.name}
            await session.commit()
            return answer

    async def on_pg_sleep(self, sid: str, seconds: float) -> Any:
        try:
            async with AsyncSession(plain_engine) as session:
                await session.execute(SLEEP, {"s": seconds})
                await session.commit()
            return True
        except sa.exc.TimeoutError:
            pool_timeouts["plain"] += 1
            return {"error": "pool_timeout"}
        except Exception:
            return {"error": "internal_error"}


class Ours(AsyncDBContextNamespace):
    async def on_noop(self, sid: str) -> int:
        return 1

    async def on_pk(self, sid: str) -> dict[str, Any]:
        item = await self.db_session.get(Item, 1)
        assert item is not None
        return {"id": item.id, "name": item.name}

    on_pk_commit = on_pk  # ours always commits

    async def on_pg_sleep(self, sid: str, seconds: float) -> bool:
        await self.db_session.execute(SLEEP, {"s": seconds})
        return True


sio.register_namespace(Plain("/plain"))
sio.register_namespace(Ours("/ours"))
SIDE = os.environ.get("AIO_BENCH_SIDE")
if SIDE:
    sio.register_namespace({"plain": Plain, "ours": Ours}[SIDE]("/l"))


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``GET /state`` and ``GET /reset``."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/reset":
        for side in peak:
            peak[side] = 0
            pool_timeouts[side] = 0
    body = {
        "peak": peak,
        "pool_timeouts": pool_timeouts,
        "checked_out": {
            side: engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
            for side, engine in ENGINES.items()
        },
    }
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


app = socketio.ASGIApp(sio, other_asgi_app=http)
