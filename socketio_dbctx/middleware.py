"""The built-in pipeline steps, outermost first::

    errors -> admission -> metrics -> retry -> transaction -> idempotency
        -> user middleware -> handler

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

from . import keyed
from .context import (
    Scope,
    after_commit,
    commit,
    open_scope,
    release,
    require_session,
)
from .errors import BusyError, ContextSetupError
from .outcomes import resolve
from .retry import retry_after
from .settle import (
    count_refused,
    failed_attempt,
    failure_outcome,
    final_ack,
    resolved,
    statement_timeout_of,
    still_unsettled,
)

if TYPE_CHECKING:
    from .admission import Admission
    from .decorators import KeyFunc
    from .pipeline import Event, Step, Wrap

__all__ = ["admission", "errors", "idempotency", "metrics", "retry", "transaction"]

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
    return final_ack(event, exc, ack, handled=on_error is not None)


def admission(limits: Admission) -> Wrap:
    """Hold the event until it is admitted. An event turned away here never reaches
    the metrics step, so it is counted as ``busy`` here. Without limits the step stays:
    it counts the events in flight for a drain, and refuses new ones during it."""

    def wrap(rest: Step) -> Step:
        def step(event: Event) -> Any:
            # limits.run(sid, rest, event), spelled out: one frame less per event, and
            # the clock read only for an event that waits
            sid = event.sid
            try:
                waiter = limits.enter(sid)
            except BusyError:  # refused at once (a drain)
                count_refused(event, time.perf_counter())
                raise
            if waiter is not None:
                start = time.perf_counter()
                try:
                    waiter.event.wait(limits.timeout)
                    limits.admitted(waiter)
                except BusyError:
                    count_refused(event, start)
                    raise
            try:
                return rest(event)
            finally:
                limits.leave(sid)

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
            outcome = failure_outcome(event, exc)
            raise
        finally:
            stats.finished(key, time.perf_counter() - start, outcome)

    return step


def retry(rest: Step) -> Step:
    """Run the rest of the chain again after a transient failure. When the last attempt
    fails while an earlier one's COMMIT is still unresolved, the answer is
    ``outcome_unknown`` (:func:`still_unsettled`)."""

    def step(event: Event) -> Any:
        try:
            return rest(event)
        except Exception as exc:
            try:
                return retry_after(event, rest, exc)
            except Exception as final:
                error = still_unsettled(event, final)
                if error is final:
                    raise
                raise error from final

    return step


def transaction(rest: Step) -> Step:
    """A fresh app context and session; commit on success, roll back on error.

    The first attempt of an event that arrived with no app context active runs in the
    app context Flask-SocketIO pushed for this event alone: it is already fresh. Every
    other case (an outer app context, a retry) pushes a new one. Statements are bounded
    by the event's statement timeout (:func:`statement_timeout_of`). A COMMIT whose
    answer was lost is settled by :func:`_settle`.
    """

    def step(event: Event) -> Any:
        event.phase = "handler"
        event.committed = False
        fresh = event.fresh_context and event.attempt == 1
        settings = event.settings
        options = event.options
        scope = open_scope(  # positional: keywords cost more, and this runs per event
            event.app,
            event.state.source,
            event,
            event.key,
            fresh,
            settings.defer_emits,
            statement_timeout_of(event) if options else settings.statement_timeout,
        )
        result: Any = _NOTHING
        try:
            with scope:
                result = rest(event)
                if scope.used and settings.commit_on_success:  # commit() of a used one
                    commit(scope)
                held = scope.take_held() if scope.held else None
        except Exception as exc:
            return _settle(event, scope, exc, result)
        if held:  # after the commit and the close, before the ack; failures are logged
            release(held, event.state.metrics.after_commit_failed)
        return result

    return step


_NOTHING = object()


def _settle(event: Event, scope: Scope, exc: Exception, result: Any) -> Any:
    """An attempt failed: re-raise what the pipeline should see of it (see
    :func:`failed_attempt`), or, for a lost COMMIT that resolved as committed, release
    the held sends and return the handler's result."""
    error = failed_attempt(event, scope, exc)
    if error is not None:
        raise error
    outcome = resolve(scope.txids, event.sleep) if scope.txids else None
    error = resolved(event, scope, exc, outcome, finished=result is not _NOTHING)
    if error is not None:
        raise error
    release(scope.held, event.state.metrics.after_commit_failed)
    return result


def idempotency(default_key: KeyFunc | None) -> Wrap:
    """Answer a repeat of an idempotency key with the stored ack; store the ack of the
    run that claims it, in its own transaction (inside ``transaction``; the rules are
    :mod:`socketio_dbctx.keyed`).

    :param default_key: the namespace's key function, for handlers without their own.
    """

    def wrap(rest: Step) -> Step:
        def step(event: Event) -> Any:
            if default_key is None and not event.options:  # most events: no key
                return rest(event)
            if keyed.key_of(event, default_key) is None:
                return rest(event)
            session = require_session()
            stored = keyed.claim(event, session)
            if stored is None:
                event.unsettled = None  # the key was free: no attempt committed it
            else:
                unsettled, event.unsettled = event.unsettled, None
                if unsettled:  # this event's own earlier attempt did commit
                    after_commit(release, unsettled, event.state.metrics.after_commit_failed)
                return stored.ack
            try:
                result = rest(event)
            except BaseException:
                keyed.failed(event, session)
                raise
            keyed.succeeded(event, session, result)
            return result

        return step

    return wrap
