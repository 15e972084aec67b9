"""socketio_dbctx for asyncio: python-socketio's ``AsyncServer`` (ASGI: uvicorn, or
mounted in FastAPI/Starlette) with SQLAlchemy's asyncio extension. The same guarantees
as the Flask version::

    sio = socketio.AsyncServer(async_mode="asgi")
    dbctx = AsyncDBContext(sio, async_sessionmaker(create_async_engine(url)))

    class Chat(AsyncDBContextNamespace):
        async def on_send(self, sid, data):
            self.db_session.add(Message(text=data["text"]))
            return {"ok": True}          # committed before the ack

    sio.register_namespace(Chat("/chat"))

One set of rules: settings, classification, acks, retries, admission counting, metrics,
keys, timeouts and transaction following are the Flask version's modules; this package
adds what is awaited (``steps``), the ``AsyncSession`` scope (``scope``), periodic tasks
(``tasks``), what the extension keeps and each namespace's chains (``state``), the
extension (``extension``), the namespace (``namespace``), the monitor (``monitor``) and
the Redis cluster view on ``redis.asyncio`` (``cluster``).
"""

from __future__ import annotations

from .extension import AsyncDBContext
from .namespace import AsyncDBContextNamespace

__all__ = ["AsyncDBContext", "AsyncDBContextNamespace"]
