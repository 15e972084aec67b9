"""The per-event pipeline: the :class:`Event`, what we know of a handler, and the chain.

A chain is built once per namespace runtime (as Starlette builds its middleware
stack once): each built-in middleware is a function that takes the rest of the
chain, a :data:`Step`, and returns a step; the innermost step calls the handler.
User middleware keeps the simpler ``mw(event, call_next)`` shape and is adapted.
The built-in steps live in :mod:`socketio_dbctx.middleware`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from .decorators import handler_options
from .errors import InvalidRequestError

if TYPE_CHECKING:
    from flask import Flask

    from .config import Settings
    from .state import AppState

__all__ = [
    "CallNext",
    "Event",
    "HandlerSpec",
    "Middleware",
    "Step",
    "Wrap",
    "adapt",
    "build_chain",
    "call_handler",
]

CallNext = Callable[[], Any]
#: User middleware: ``mw(event, call_next)``; its return value becomes the ack.
Middleware = Callable[["Event", CallNext], Any]
#: One built step of a chain: takes the event, returns the ack.
Step = Callable[["Event"], Any]
#: A built-in middleware: given the rest of the chain, returns its own step.
Wrap = Callable[[Step], Step]


class HandlerSpec:
    """What we know of one handler, worked out once: its decorator options and how
    many client arguments it accepts."""

    __slots__ = ("max_args", "min_args", "options")

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.options = handler_options(handler)
        self.min_args = 0
        self.max_args: float = 0
        for param in inspect.signature(handler).parameters.values():
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                self.max_args += 1
                if param.default is param.empty:
                    self.min_args += 1
            elif param.kind is param.VAR_POSITIONAL:
                self.max_args = float("inf")
            elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
                self.min_args = -1  # cannot be called with client arguments at all

    def accepts(self, count: int) -> bool:
        """Whether the handler can be called with ``count`` client arguments."""
        return self.min_args != -1 and self.min_args <= count <= self.max_args

    def describe_arity(self) -> str:
        """The accepted argument count, for error messages."""
        if self.min_args == -1:
            return "no client"
        if self.max_args == self.min_args:
            return str(self.min_args)
        if self.max_args == float("inf"):
            return f"at least {self.min_args}"
        return f"{self.min_args} to {int(self.max_args)}"


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
    :ivar idempotency_key: the client's key, when the handler has one (read by the
        ``idempotency`` step).
    :ivar unsettled: the held sends of an attempt whose COMMIT lost its answer; sent if
        a later attempt finds that COMMIT went through.
    """

    __slots__ = (
        "app",
        "args",
        "attempt",
        "committed",
        "fresh_context",
        "handler",
        "idempotency_key",
        "key",
        "name",
        "namespace",
        "options",
        "phase",
        "settings",
        "sid",
        "sleep",
        "spec",
        "state",
        "unsettled",
    )

    def __init__(
        self,
        app: Flask,
        state: AppState,
        settings: Settings,
        namespace: str,
        name: str,
        sid: str | None,
        args: tuple[Any, ...],
        handler: Callable[..., Any],
        spec: HandlerSpec,
        sleep: Callable[[float], Any],
        fresh_context: bool = False,
    ) -> None:
        # positional: one is built per event, and keywords cost more
        self.app = app
        self.state = state
        self.settings = settings
        self.namespace = namespace
        self.name = name
        self.sid = sid
        self.args = args
        self.handler = handler
        self.spec = spec
        self.options = spec.options
        self.sleep = sleep
        self.fresh_context = fresh_context
        self.key = f"{namespace}:{name}"
        self.attempt = 1
        self.phase = "admission"
        self.committed = False
        self.idempotency_key: str | None = None
        self.unsettled: list[Callable[[], Any]] | None = None

    def __repr__(self) -> str:
        return f"<Event {self.key} sid={self.sid} attempt={self.attempt}>"


def call_handler(event: Event) -> Any:
    """The end of every chain: check the argument count, then call the handler."""
    spec, count = event.spec, len(event.args)
    if not (spec.min_args <= count <= spec.max_args and spec.min_args != -1):  # accepts()
        raise InvalidRequestError(
            f"{event.name} takes {event.spec.describe_arity()} argument(s), got {len(event.args)}"
        )
    return event.handler(*event.args)


def adapt(middleware: Middleware) -> Wrap:
    """Turn a user's ``mw(event, call_next)`` into a chain step."""

    def wrap(rest: Step) -> Step:
        def step(event: Event) -> Any:
            return middleware(event, partial(rest, event))

        return step

    return wrap


def build_chain(wraps: Sequence[Wrap], endpoint: Step = call_handler) -> Step:
    """Build the chain once: ``wraps[0]`` outermost, ``endpoint`` innermost."""
    step = endpoint
    for wrap in reversed(wraps):
        step = wrap(step)
    return step
