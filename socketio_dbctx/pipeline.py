"""The per-event middleware chain (Starlette's shape: ``mw(event, call_next)``).

The built-in order, outermost first::

    admission -> metrics -> retry -> transaction -> user middleware -> handler

``transaction`` opens the fresh app context and session, so everything inside it
(user middleware included) runs once per attempt with its own session.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import exc as sa_exc

from .context import commit, open_scope
from .transient import error_code

if TYPE_CHECKING:
    from flask import Flask

    from .config import Settings
    from .extension import AppState

__all__ = ["Event", "Middleware", "metrics_middleware", "run_chain", "transaction_middleware"]

CallNext = Callable[[], Any]
Middleware = Callable[["Event", CallNext], Any]


class Event:
    """One Socket.IO event on its way through the pipeline.

    :ivar namespace: the namespace, e.g. ``"/chat"``.
    :ivar name: the event name, e.g. ``"send"``.
    :ivar sid: the client's session id.
    :ivar args: the arguments the client sent.
    :ivar attempt: 1 for the first run, 2 for the first retry, ...
    :ivar phase: ``"admission"`` until admitted, ``"handler"`` until a COMMIT starts,
        then ``"commit"``.
    :ivar committed: True once a COMMIT of this event went through (the handler's own
        included): a retry would apply it twice.
    """

    __slots__ = (
        "app",
        "args",
        "attempt",
        "committed",
        "fresh_context",
        "handler",
        "key",
        "name",
        "namespace",
        "options",
        "phase",
        "settings",
        "sid",
        "sleep",
        "state",
    )

    def __init__(
        self,
        *,
        app: Flask,
        state: AppState,
        settings: Settings,
        namespace: str,
        name: str,
        sid: str | None,
        args: tuple[Any, ...],
        handler: Callable[..., Any],
        options: dict[str, Any],
        sleep: Callable[[float], Any],
        fresh_context: bool = False,
    ) -> None:
        self.app = app
        self.state = state
        self.settings = settings
        self.namespace = namespace
        self.name = name
        self.sid = sid
        self.args = args
        self.handler = handler
        self.options = options
        self.sleep = sleep
        self.fresh_context = fresh_context
        self.key = f"{namespace}:{name}"
        self.attempt = 1
        self.phase = "admission"
        self.committed = False

    def __repr__(self) -> str:
        return f"<Event {self.key} sid={self.sid} attempt={self.attempt}>"


def run_chain(
    middleware: Sequence[Middleware], event: Event, endpoint: Callable[[Event], Any]
) -> Any:
    """Run ``event`` through ``middleware`` and then ``endpoint``.

    Each ``call_next`` is a ``functools.partial`` (no Python frame of its own), and
    may be called again, as the retry middleware does.
    """
    call_next: CallNext = partial(endpoint, event)
    for step in reversed(middleware):
        call_next = partial(step, event, call_next)
    return call_next()


def metrics_middleware(event: Event, call_next: CallNext) -> Any:
    """Count the event and time it, retries included."""
    metrics = event.state.metrics
    key = event.key
    metrics.started(key, event.namespace, event.name)
    start = time.perf_counter()
    outcome = "error"
    try:
        result = call_next()
        outcome = "ok"
        return result
    except Exception as exc:
        if error_code(exc) == "busy":
            outcome = "busy"
            if isinstance(exc, sa_exc.TimeoutError):
                metrics.pool_timeout()
        raise
    finally:
        metrics.finished(key, time.perf_counter() - start, outcome)


def transaction_middleware(event: Event, call_next: CallNext) -> Any:
    """A fresh app context and session; commit on success, roll back on error.

    The first attempt of an event that arrived with no app context active runs in the
    app context Flask-SocketIO pushed for this event alone: it is already fresh. Every
    other case (an outer app context, a retry) pushes a new one.
    """
    event.phase = "handler"
    event.committed = False
    fresh = event.fresh_context and event.attempt == 1
    with open_scope(
        event.app, event.state.source, event=event, label=event.key, fresh_context=fresh
    ) as scope:
        result = call_next()
        if event.settings.commit_on_success:
            commit(scope)
        return result
