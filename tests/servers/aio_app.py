"""An asyncio test server: python-socketio's ``AsyncServer`` under uvicorn, with
``AsyncDBContext`` over asyncpg (``uvicorn tests.servers.aio_app:app``).

Configured by the environment: ``AIO_DATABASE_URL`` (a ``postgresql+asyncpg://`` URL),
``AIO_SCHEMA`` (its search path), ``AIO_POOL`` (``size,overflow,timeout``) and
``AIO_OPTIONS`` (JSON: ``AsyncDBContext`` keyword options).

Namespace ``/a`` (an ``AsyncDBContextNamespace``); every handler that takes a ``token``
counts its runs; clients join room ``"all"`` on connect:

* ``write(token)``: inserts ``aio_rows(token)``, emits ``written`` to the room; acks
  ``{"token", "session"}`` (the id of the session it used).
* ``fail(token)``: inserts, emits, then raises ``RuntimeError`` (rolled back, emit
  dropped). ``invalid()``: raises ``InvalidRequestError``.
* ``hold(token, seconds)``: inserts, then ``pg_sleep(seconds)`` (holds a connection).
* ``overlap(token)``: records its session in a set of sessions in use, yields to the
  loop, checks nobody else holds the same session object; acks whether it was alone.
* ``kill_self(token, times)``: the first ``times`` runs terminate their own backend
  before inserting; later runs insert (retried as a lost connection).
* ``serialize(token, times)``: inserts, then the first ``times`` runs fail with SQLSTATE
  ``40001`` (retried from the start, as a serialization failure).
* ``keyed({"key", "token"})``: ``@idempotency_key``; inserts and emits.
* ``slow(seconds)``: ``pg_sleep`` under the statement timeout.
* ``refuse`` connect: a client whose auth is ``{"refuse": True}`` is refused.

Function handler ``/a`` ``double(x)`` via ``dbctx.on``. HTTP: ``GET /state`` ->
``{"runs", "metrics", "pool", "health"}``; ``GET /drain`` -> drains and answers.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import socketio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from socketio_dbctx import InvalidRequestError, idempotency_key
from socketio_dbctx.aio import AsyncDBContext, AsyncDBContextNamespace

size, overflow, pool_timeout = (os.environ.get("AIO_POOL") or "5,0,30").split(",")
engine = create_async_engine(
    os.environ["AIO_DATABASE_URL"],
    pool_size=int(size),
    max_overflow=int(overflow),
    pool_timeout=float(pool_timeout),
    connect_args={"server_settings": {"search_path": os.environ.get("AIO_SCHEMA", "public")}},
)
sio = socketio.AsyncServer(async_mode="asgi")
dbctx = AsyncDBContext(
    sio, async_sessionmaker(engine), **json.loads(os.environ.get("AIO_OPTIONS") or "{}")
)

runs: dict[str, int] = {}
in_use: set[int] = set()
tasks: dict[str, Any] = {}


def _scope_session() -> Any:
    from socketio_dbctx.context import current_scope

    scope = current_scope()
    assert scope is not None, "a periodic run has a scope of its own"
    return scope.session


def count(event: str, token: str) -> int:
    key = f"{event}:{token}"
    runs[key] = runs.get(key, 0) + 1
    return runs[key]


async def insert(session: Any, token: str) -> None:
    await session.execute(sa.text("INSERT INTO aio_rows (token) VALUES (:t)"), {"t": token})


class Rows(AsyncDBContextNamespace):
    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> Any:
        if isinstance(auth, dict) and auth.get("refuse"):
            return False
        await self.enter_room(sid, "all")
        return None

    async def on_write(self, sid: str, token: str) -> dict[str, Any]:
        count("write", token)
        await insert(self.db_session, token)
        await self.emit("written", token, room="all")
        return {"token": token, "session": id(self.db_session)}

    async def on_fail(self, sid: str, token: str) -> None:
        count("fail", token)
        await insert(self.db_session, token)
        await self.emit("written", token, room="all")
        raise RuntimeError("boom: SELECT secret FROM vault")

    async def on_invalid(self, sid: str) -> None:
        raise InvalidRequestError("bad amount")

    async def on_hold(self, sid: str, token: str, seconds: float) -> str:
        count("hold", token)
        await insert(self.db_session, token)
        await self.db_session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
        return token

    async def on_overlap(self, sid: str, token: str) -> bool:
        count("overlap", token)
        session = self.db_session
        mine = id(session)
        alone = mine not in in_use
        in_use.add(mine)
        try:
            await session.execute(sa.text("SELECT 1"))
            await asyncio.sleep(0.01)  # let the other events run meanwhile
            await insert(session, token)
        finally:
            in_use.discard(mine)
        return alone

    async def on_kill_self(self, sid: str, token: str, times: int) -> str:
        if count("kill_self", token) <= times:
            await self.db_session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        await insert(self.db_session, token)
        return token

    async def on_serialize(self, sid: str, token: str, times: int) -> str:
        await insert(self.db_session, token)
        if count("serialize", token) <= times:  # what a serialization failure raises
            await self.db_session.execute(
                sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            )
        return token

    @idempotency_key(lambda data: data.get("key"))
    async def on_keyed(self, sid: str, data: dict[str, Any]) -> dict[str, Any]:
        count("keyed", data["token"])
        await insert(self.db_session, data["token"])
        await self.emit("written", data["token"], room="all")
        return {"token": data["token"]}

    async def on_slow(self, sid: str, seconds: float) -> str:
        await self.db_session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
        return "slept"

    async def on_periodic(self, sid: str, token: str, interval: float) -> str:
        async def tick() -> None:
            await insert(_scope_session(), token)

        tasks[token] = dbctx.start_periodic_task(tick, interval)
        return "started"

    async def on_stop_periodic(self, sid: str, token: str) -> dict[str, Any]:
        task = tasks.pop(token)
        stopped = await task.stop(5)
        return {"stopped": stopped, "runs": task.runs, "failures": task.failures}

    async def on_background(self, sid: str, token: str) -> str:
        async def work() -> None:
            async with dbctx.session_scope() as session:
                await insert(session, token)

        dbctx.start_background_task(work)
        return "started"


sio.register_namespace(Rows("/a"))


@dbctx.on("double", namespace="/a")
async def double(sid: str, x: int) -> int:
    return x * 2


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``GET /state`` and ``GET /drain``."""
    if scope["path"] == "/drain":
        body: Any = {"drained": await dbctx.drain(10)}
    else:
        body = {
            "runs": runs,
            "metrics": dbctx.metrics(),
            "pool": dbctx.pool_status(),
            "health": await dbctx.health_check(),
            "status": dbctx.status(),
        }
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


app = socketio.ASGIApp(sio, other_asgi_app=http)
