"""Transactional emits: inside a scope, what a handler emits is held until the scope
commits, sent in call order before the ack, and dropped on rollback.

Every ``emit``/``send`` of Flask-SocketIO (``flask_socketio.emit``/``send``,
``socketio.emit``/``send``, ``Namespace.emit``/``send``) ends in the python-socketio
server's ``emit``, which :func:`install` wraps once per server. The target is
resolved when the handler emits: Flask-SocketIO has already turned a bare ``emit``
into the caller's sid and ``include_self=False`` into ``skip_sid``; without a message
queue a room (or the whole namespace) is turned into the list of its members right
then, so a ``join_room`` after the emit, or a client leaving before the commit,
changes nothing. With a message queue (Redis) membership is known only to each
worker, so the room is kept and resolved by every worker when the emit goes out.
``call()`` (which waits for the client's answer), ``join_room``, ``leave_room`` and
``disconnect`` are never held.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from socketio import PubSubManager

from .context import current_scope

__all__ = ["immediate_emits", "install"]

_IMMEDIATE: ContextVar[bool] = ContextVar("socketio_dbctx_immediate", default=False)
_ATTR = "_dbctx_emits"


@contextmanager
def immediate_emits() -> Iterator[None]:
    """Send the emits made inside this block at once, even inside a scope (progress
    messages); holding resumes after it."""
    token = _IMMEDIATE.set(True)
    try:
        yield
    finally:
        _IMMEDIATE.reset(token)


def _members(server: Any, namespace: str, room: Any, skip_sid: Any) -> list[str]:
    skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
    return [sid for sid, _ in server.manager.get_participants(namespace, room) if sid not in skip]


def install(server: Any) -> None:
    """Hold the emits of ``server`` (a python-socketio ``Server`` or ``AsyncServer``)
    made inside scopes that defer them; once per server."""
    if server is None or getattr(server, _ATTR, False):
        return
    emit, call = server.emit, server.call

    def prepare(
        event: str,
        data: Any = None,
        to: Any = None,
        room: Any = None,
        skip_sid: Any = None,
        namespace: str | None = None,
        callback: Any = None,
        ignore_queue: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """``(scope to hold the send in, or None, the send)``; the send is None when
        nobody is addressed any more."""
        scope = current_scope()
        held = scope is not None and scope.defer and not _IMMEDIATE.get()
        namespace = namespace or "/"
        if held and (ignore_queue or not isinstance(server.manager, PubSubManager)):
            # capture who is addressed now; nobody left means nothing to send
            sids = _members(server, namespace, to or room, skip_sid)
            if not sids:
                return scope, None
            to, room, skip_sid = sids, None, None
        send = functools.partial(
            emit,
            event,
            data,
            to=to,
            room=room,
            skip_sid=skip_sid,
            namespace=namespace,
            callback=callback,
            ignore_queue=ignore_queue,
            **kwargs,
        )
        return (scope if held else None), send

    if inspect.iscoroutinefunction(emit):

        async def held_emit_async(*args: Any, **kwargs: Any) -> Any:
            scope, send = prepare(*args, **kwargs)
            if scope is None:
                return await send()
            if send is not None:
                scope.hold(send)  # released (and awaited) after the commit
            return None

        async def immediate_call_async(*args: Any, **kwargs: Any) -> Any:
            with immediate_emits():
                return await call(*args, **kwargs)

        server.emit, server.call = held_emit_async, immediate_call_async
    else:

        def held_emit(*args: Any, **kwargs: Any) -> Any:
            scope, send = prepare(*args, **kwargs)
            if scope is None:
                return send()
            if send is not None:
                scope.hold(send)
            return None

        def immediate_call(*args: Any, **kwargs: Any) -> Any:
            # call() waits for the client's answer: holding its emit would wait for ever
            with immediate_emits():
                return call(*args, **kwargs)

        server.emit, server.call = held_emit, immediate_call
    setattr(server, _ATTR, True)
