"""The built-in pipeline steps, outermost first::

    errors -> admission -> metrics -> retry -> transaction -> user middleware -> handler

Each is a :data:`~socketio_dbctx.pipeline.Wrap`: it takes the rest of the chain and
returns its own step, once, when a namespace's runtime is built. ``transaction``
opens the fresh app context and session, so everything inside it (user middleware
included) runs once per attempt with its own session. Connect and disconnect skip
admission: a full pool must not stop clients from connecting or leaving.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from socketio.exceptions import ConnectionRefusedError as SocketIORefused
from sqlalchemy import exc as sa_exc

from .acks import error_code, error_payload, log_failure
from .context import commit, open_scope, release
from .errors import BusyError, ContextSetupError
from .retry import retry_after

if TYPE_CHECKING:
    from .admission import Admission
    from .pipeline import Event, Step, Wrap

__all__ = ["admission", "errors", "metrics", "retry", "transaction"]

logger = logging.getLogger(__name__)

#: An error handler: ``handler(exc)``'s return value is the ack.
ErrorHandler = Callable[[Exception], Any]
#: Finds the error handler of a failed event, if any.
ErrorHandlerFinder = Callable[["Event"], "ErrorHandler | None"]


def errors(find: ErrorHandlerFinder) -> Wrap:
    """Turn a failure into the ack: the error handler's value, else an error payload.

    The handler (see :func:`~socketio_dbctx.dispatch.find_error_handler`) runs in a
    fresh scope of its own, its session usable and committed. A refused or crashed
    connect refuses the client; refusals pass through.
    """

    def wrap(rest: Step) -> Step:
        def step(event: Event) -> Any:
            try:
                result = rest(event)
            except (ConnectionRefusedError, SocketIORefused):
                if event.name == "connect":
                    logger.info("connection to %s refused for sid %s", event.namespace, event.sid)
                raise
            except ContextSetupError:
                raise
            except Exception as exc:
                return _answer(event, exc, find(event))
            if event.name == "connect" and result is False:
                logger.info("connection to %s refused for sid %s", event.namespace, event.sid)
            return result

        return step

    return wrap


def _answer(event: Event, exc: Exception, on_error: ErrorHandler | None) -> Any:
    ack = None
    if on_error is not None:
        try:
            with open_scope(
                event.app,
                event.state.source,
                event=event,
                label=event.key,
                defer=event.settings.defer_emits,
            ) as scope:
                ack = on_error(exc)
                commit(scope)
                held = scope.take_held()
            release(held, event.state.metrics.after_commit_failed)
        except (ConnectionRefusedError, SocketIORefused):
            if event.name == "connect":
                raise
            logger.exception("the error handler of %s raised while handling %s", event.key, exc)
            on_error = None
        except Exception:
            logger.exception("the error handler of %s raised while handling %s", event.key, exc)
            on_error = None
    if on_error is None:
        log_failure(event.key, event.sid, exc, event.state.log_throttle)
        ack = error_payload(exc, expose=event.settings.expose_errors)
    if event.name == "connect":
        # A connect handler that crashed must not let the client in.
        payload = error_payload(exc, expose=event.settings.expose_errors)
        raise SocketIORefused(payload["error"], payload)
    return None if event.name == "disconnect" else ack


def admission(limits: Admission) -> Wrap:
    """Hold the event until it is admitted. An event turned away here never reaches
    the metrics step, so it is counted as ``busy`` here. Without limits the step stays:
    it counts the events in flight for a drain, and refuses new ones during it."""

    def wrap(rest: Step) -> Step:
        def step(event: Event) -> Any:
            start = time.perf_counter()
            try:
                return limits.run(event.sid, rest, event)
            except BusyError:
                if event.phase == "admission":
                    stats = event.state.metrics
                    stats.started(event.key, event.namespace, event.name)
                    stats.finished(event.key, time.perf_counter() - start, "busy")
                raise

        return step

    return wrap


def metrics(rest: Step) -> Step:
    """Count the event and time it, retries included."""

    def step(event: Event) -> Any:
        stats = event.state.metrics
        key = event.key
        stats.started(key, event.namespace, event.name)
        start = time.perf_counter()
        outcome = "error"
        try:
            result = rest(event)
            outcome = "ok"
            return result
        except Exception as exc:
            if error_code(exc) == "busy":
                outcome = "busy"
                if isinstance(exc, sa_exc.TimeoutError):
                    stats.pool_timeout()
            raise
        finally:
            stats.finished(key, time.perf_counter() - start, outcome)

    return step


def retry(rest: Step) -> Step:
    """Run the rest of the chain again after a transient failure."""

    def step(event: Event) -> Any:
        try:
            return rest(event)
        except Exception as exc:
            return retry_after(event, rest, exc)

    return step


def transaction(rest: Step) -> Step:
    """A fresh app context and session; commit on success, roll back on error.

    The first attempt of an event that arrived with no app context active runs in the
    app context Flask-SocketIO pushed for this event alone: it is already fresh. Every
    other case (an outer app context, a retry) pushes a new one.
    """

    def step(event: Event) -> Any:
        event.phase = "handler"
        event.committed = False
        fresh = event.fresh_context and event.attempt == 1
        settings = event.settings
        with open_scope(
            event.app,
            event.state.source,
            event=event,
            label=event.key,
            fresh_context=fresh,
            defer=settings.defer_emits,
        ) as scope:
            result = rest(event)
            if settings.commit_on_success:
                commit(scope)
            held = scope.take_held() if scope.held else None
        if held:  # after the commit and the close, before the ack; failures are logged
            release(held, event.state.metrics.after_commit_failed)
        return result

    return step
