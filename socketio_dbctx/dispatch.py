"""Runtimes: one namespace's settings and chains in one app, built once.

A namespace (class or, later, a group of function handlers) asks its
:class:`RuntimeCache` for the runtime of the app an event runs in; the first event
builds it: the settings with the namespace's overrides, its admission, and the two
chains (events, and connect/disconnect without admission).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from flask import Flask

from . import middleware
from .admission import Admission
from .config import Settings
from .pipeline import Middleware, Step, Wrap, adapt, build_chain
from .state import AppState, app_state

__all__ = ["LIFECYCLE", "Runtime", "RuntimeCache"]

#: Events that skip admission: a full pool must not stop clients connecting or leaving.
LIFECYCLE = frozenset({"connect", "disconnect"})


class Runtime:
    """One namespace's settings, admission and chains in one app."""

    __slots__ = ("admission", "chain", "lifecycle_chain", "settings", "state")

    def __init__(
        self,
        state: AppState,
        settings: Settings,
        admission: Admission,
        extra: Sequence[Middleware],
        on_error: Callable[[Exception], Any] | None,
    ) -> None:
        self.state = state
        self.settings = settings
        self.admission = admission
        inner: tuple[Wrap, ...] = (
            middleware.metrics,
            middleware.retry,
            middleware.transaction,
            *(adapt(mw) for mw in extra),
        )
        errors = middleware.errors(on_error)
        self.chain: Step = build_chain((errors, middleware.admission(admission), *inner))
        self.lifecycle_chain: Step = build_chain((errors, *inner))

    def chain_for(self, name: str) -> Step:
        """The chain an event called ``name`` runs through."""
        return self.lifecycle_chain if name in LIFECYCLE else self.chain


class RuntimeCache:
    """The runtimes of one namespace, by app (weakly: an app that goes away frees its).

    :param overrides: the namespace's setting overrides (``None``: the app's value).
    :param extra: user middleware, innermost.
    :param on_error: the namespace's own error handler, if any.
    """

    # First events of many clients at once must not build two runtimes (two admissions).
    _LOCK = threading.RLock()

    def __init__(
        self,
        overrides: Mapping[str, Any],
        extra: Sequence[Middleware],
        on_error: Callable[[Exception], Any] | None,
    ) -> None:
        self.overrides = dict(overrides)
        self.extra = tuple(extra)
        self.on_error = on_error
        self._runtimes: weakref.WeakKeyDictionary[Flask, Runtime] = weakref.WeakKeyDictionary()

    def get(self, app: Flask, socketio: Any) -> Runtime:
        """The runtime of ``app``, built by the first event."""
        runtime = self._runtimes.get(app)
        if runtime is None:
            with self._LOCK:
                runtime = self._runtimes.get(app)
                if runtime is None:
                    runtime = self._runtimes[app] = self._build(app, socketio)
        return runtime

    def _build(self, app: Flask, socketio: Any) -> Runtime:
        state = app_state(app, socketio)
        async_mode = socketio.server.async_mode
        state.check_drivers(app, async_mode)
        settings = state.settings.override(self.overrides)
        admission = Admission(
            state.process_limit(app, async_mode),
            settings.max_in_flight_per_client,
            settings.queue_timeout,
        )
        return Runtime(state, settings, admission, self.extra, self.on_error)
