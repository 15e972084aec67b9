"""``DBContextNamespace``: every event in its own app context and session."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Callable

from flask import Flask, current_app, has_app_context, request
from flask_socketio import Namespace
from socketio.exceptions import ConnectionRefusedError as SocketIORefused
from sqlalchemy.orm import Session

from .config import NamespaceSettings
from .context import require_session
from .dispatch import LIFECYCLE, RuntimeCache
from .errors import ContextSetupError
from .pipeline import Event, HandlerSpec, Middleware

__all__ = ["DBContextNamespace"]

logger = logging.getLogger(__name__)


class DBContextNamespace(NamespaceSettings, Namespace):  # type: ignore[misc]
    """A Flask-SocketIO ``Namespace`` whose handlers each run in a fresh app context
    with a fresh session, committed on success and rolled back on error.

    Class attributes named after settings (``max_retries = 0``, see
    :class:`~socketio_dbctx.config.NamespaceSettings`) override the app's
    configuration for this namespace; ``None`` keeps the app's value.
    ``extra_middleware`` is a sequence of ``mw(event, call_next)`` callables run
    innermost, just around the handler, inside the event's context.
    """

    extra_middleware: Sequence[Middleware] = ()

    def __init__(self, namespace: str | None = None) -> None:
        super().__init__(namespace)
        self._dbctx_runtimes: RuntimeCache | None = None
        self._dbctx_specs: dict[str, HandlerSpec] = {}

    @property
    def session(self) -> Session:
        """The current event's session (the same one as ``db.session`` in the handler)."""
        return require_session()

    def trigger_event(self, event: str, *args: Any) -> Any:
        """Run ``on_<event>`` through the per-event pipeline; return the ack."""
        handler = getattr(self, "on_" + (event or ""), None)
        if handler is None:
            return None

        # With no app context active now, the one Flask-SocketIO pushes for this event
        # is new and ours alone; with an outer one active, it would be reused.
        fresh = not has_app_context()

        def wrapped(*payload: Any) -> Any:
            try:
                return self._dbctx_dispatch(event, handler, payload, fresh)
            except SocketIORefused:
                raise
            except ConnectionRefusedError as exc:
                # Flask-SocketIO lets only socketio's own class past its error handlers
                # (on_error_default would accept the client): convert the built-in one.
                raise SocketIORefused(*exc.args) from exc
            except ContextSetupError:
                if event != "connect":
                    raise
                logger.exception("connection to %s refused: setup error", self.namespace)
                raise SocketIORefused("internal_error") from None

        return self.socketio._handle_event(wrapped, event, self.namespace, *args)

    def _dbctx_spec(self, name: str, handler: Callable[..., Any]) -> HandlerSpec:
        spec = self._dbctx_specs.get(name)
        if spec is None:
            spec = self._dbctx_specs[name] = HandlerSpec(handler)
        return spec

    def _dbctx_dispatch(
        self, name: str, handler: Callable[..., Any], payload: tuple[Any, ...], fresh: bool
    ) -> Any:
        # Runs inside Flask-SocketIO's request context: request.sid is set.
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        runtimes = self._dbctx_runtimes
        if runtimes is None:
            runtimes = self._dbctx_runtimes = RuntimeCache(
                self.setting_overrides(), self.extra_middleware, getattr(self, "error", None)
            )
        runtime = runtimes.get(app, self.socketio)
        spec = self._dbctx_spec(name, handler)
        if name in LIFECYCLE:
            # connect gets (auth,), disconnect (reason,): pass them only when accepted
            payload = payload if payload and spec.accepts(len(payload)) else ()
        event = Event(
            app=app,
            state=runtime.state,
            settings=runtime.settings,
            namespace=self.namespace,
            name=name,
            sid=getattr(request, "sid", None),
            args=payload,
            handler=handler,
            spec=spec,
            sleep=self.socketio.sleep,
            fresh_context=fresh,
        )
        return runtime.chain_for(name)(event)
