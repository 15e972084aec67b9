"""A FastAPI app with Socket.IO mounted: a chat on ``AsyncDBContextNamespace`` (python-socketio's
``AsyncServer`` + SQLAlchemy asyncio over asyncpg). Every event runs in its own
``AsyncSession``, committed before the ack, rolled back and answered on error; the HTTP
routes share the same engine.

Needs: ``pip install 'socketio-dbctx[asyncio]' fastapi uvicorn`` and PostgreSQL
(``DATABASE_URL``, default ``postgresql+asyncpg://postgres@127.0.0.1:5432/test``).

Run: ``uvicorn examples.fastapi_app:app`` from the repository root (or
``python examples/fastapi_app.py``, ``PORT`` default 8000). A client::

    import socketio
    client = socketio.Client()
    client.connect("http://127.0.0.1:8000", namespaces=["/chat"])
    client.call("send", {"text": "hello"}, namespace="/chat")   # {"ok": True, "id": 1}
    client.call("history", 10, namespace="/chat")              # {"messages": [...]}

HTTP: ``GET /messages/count``, ``POST /messages`` (``{"text": ...}``, broadcast to the chat)
and ``GET /health`` (the pool dict and a ``SELECT 1``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import socketio
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from socketio_dbctx import InvalidRequestError, idempotency_key
from socketio_dbctx.aio import AsyncDBContext, AsyncDBContextNamespace

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
engine = create_async_engine(DATABASE_URL, pool_size=5, max_overflow=0)
Session = async_sessionmaker(engine, expire_on_commit=False)
sio = socketio.AsyncServer(async_mode="asgi")
dbctx = AsyncDBContext(sio, Session)  # options: the DBCTX_* settings, lower case


class Base(DeclarativeBase):
    pass


class Message(Base):
    __tablename__ = "chat_messages"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(200))


def as_dict(message: Message) -> dict[str, Any]:
    return {"id": message.id, "text": message.text}


class Chat(AsyncDBContextNamespace):
    @idempotency_key(lambda data: data.get("key") if isinstance(data, dict) else None)
    async def on_send(self, sid, data):  # python-socketio passes the sid first
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise InvalidRequestError("send takes {'text': str}")  # -> invalid_request ack
        message = Message(text=data["text"][:200])
        self.db_session.add(message)
        await self.db_session.flush()  # the id, inside the event's transaction
        await self.emit("message", as_dict(message))  # held until the COMMIT
        return {"ok": True, "id": message.id}  # committed before this ack is sent

    async def on_history(self, sid, limit=20):
        query = sa.select(Message).order_by(Message.id.desc()).limit(min(int(limit), 100))
        rows = await self.db_session.scalars(query)
        return {"messages": [as_dict(m) for m in rows]}


sio.register_namespace(Chat("/chat"))


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    await dbctx.create_tables()  # the idempotency keys' table
    yield
    await dbctx.drain(10)  # finish the events in flight, refuse new ones (busy)
    await engine.dispose()


api = FastAPI(lifespan=lifespan)


@api.get("/messages/count")
async def count_messages() -> dict[str, int]:
    async with Session() as session:  # the same engine and pool as the events
        return {"messages": await session.scalar(sa.select(sa.func.count(Message.id)))}


@api.post("/messages")
async def post_message(body: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(body.get("text"), str):
        raise HTTPException(422, "post {'text': str}")
    async with dbctx.session_scope() as session:  # committed at the end of the block
        message = Message(text=body["text"][:200])
        session.add(message)
        await session.flush()
        await sio.emit("message", as_dict(message), namespace="/chat")  # held until commit
    return {"ok": True, "id": message.id}


@api.get("/health")
async def health() -> dict[str, Any]:
    return {"status": dbctx.status(), "pool": dbctx.pool_status(), **await dbctx.health_check()}


app = socketio.ASGIApp(sio, other_asgi_app=api)  # Socket.IO at /socket.io, the rest FastAPI

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
