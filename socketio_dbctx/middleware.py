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
from sqlalchemy import exc as sa_exc

from . import keyed
from .acks import error_code, error_payload, log_failure
from .context import (
    Scope,
    ScopeState,
    after_commit,
    commit,
    open_scope,
    release,
    require_session,
)
from .errors import BusyError, ContextSetupError, OutcomeUnknownError, StatementTimeoutError
from .outcomes import Outcome, resolve
from .retry import rerun_is_safe, retry_after
from .transient import is_connection_error

if TYPE_CHECKING:
    from .admission import Admission
    from .decorators import KeyFunc
    from .pipeline import Event, Step, Wrap

__all__ = [
    "admission",
    "count_refused",
    "errors",
    "failed_attempt",
    "failure_outcome",
    "final_ack",
    "idempotency",
    "metrics",
    "resolved",
    "retry",
    "statement_timeout_of",
    "still_unsettled",
    "transaction",
]

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


def final_ack(event: Event, exc: Exception, ack: Any, *, handled: bool) -> Any:
    """The ack of a failed event: the error handler's ``ack`` when it ``handled`` the
    failure, else the logged error payload. A failed connect refuses the client; a
    disconnect has no ack."""
    if not handled:
        log_failure(event.key, event.sid, exc, event.state.log_throttle)
        ack = error_payload(exc, expose=event.settings.expose_errors)
    if event.name == "connect":
        # A connect handler that crashed must not let the client in.
        payload = error_payload(exc, expose=event.settings.expose_errors)
        raise SocketIORefused(payload["error"], payload)
    return None if event.name == "disconnect" else ack


def count_refused(event: Event, start: float) -> None:
    """Count an event turned away by admission (it never reached the metrics step)."""
    stats = event.state.metrics
    stats.started(event.key, event.namespace, event.name)
    stats.finished(event.key, time.perf_counter() - start, "busy")


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
                    count_refused(event, start)
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
            outcome = failure_outcome(event, exc)
            raise
        finally:
            stats.finished(key, time.perf_counter() - start, outcome)

    return step


def failure_outcome(event: Event, exc: Exception) -> str:
    """The metrics outcome of a failed event: ``busy`` (a pool checkout timeout also
    counted as one), else ``error``."""
    if error_code(exc) != "busy":
        return "error"
    if isinstance(exc, sa_exc.TimeoutError):
        event.state.metrics.pool_timeout()
    return "busy"


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


def still_unsettled(event: Event, final: Exception) -> Exception:
    """What a final failure becomes: ``outcome_unknown`` when an earlier attempt's
    COMMIT lost its answer and no later attempt found out (a re-run that claimed the
    key proves it did not commit, a successful one makes it moot), else itself."""
    if event.unsettled is None or isinstance(final, OutcomeUnknownError):
        return final
    return OutcomeUnknownError(
        "an attempt's COMMIT lost its answer and the attempts after it failed too "
        f"({type(final).__name__}); check before trying again"
    )


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
        scope = open_scope(
            event.app,
            event.state.source,
            event=event,
            label=event.key,
            fresh_context=fresh,
            defer=settings.defer_emits,
            timeout=statement_timeout_of(event) if options else settings.statement_timeout,
        )
        result: Any = _NOTHING
        try:
            with scope:
                result = rest(event)
                if settings.commit_on_success:
                    commit(scope)
                held = scope.take_held() if scope.held else None
        except Exception as exc:
            return _settle(event, scope, exc, result)
        if held:  # after the commit and the close, before the ack; failures are logged
            release(held, event.state.metrics.after_commit_failed)
        return result

    return step


_NOTHING = object()


def statement_timeout_of(event: Event) -> float | None:
    """The event's statement timeout: its handler's ``@statement_timeout`` (``None``
    included), else the namespace's or the app's ``statement_timeout``."""
    options = event.options
    if "statement_timeout" in options:
        return options["statement_timeout"]  # type: ignore[no-any-return]
    return event.settings.statement_timeout


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


def failed_attempt(event: Event, scope: ScopeState, exc: Exception) -> Exception | None:
    """What to raise for a failed attempt; None for a COMMIT that lost its answer,
    which :func:`resolved` decides once the database was asked.

    A statement the watchdog cut is a statement timeout. A failure the server answered
    (at COMMIT too) is what it is.
    """
    watch = scope.watch
    cut = watch is not None and watch.cut
    if event.phase != "commit" or event.committed:
        if cut:
            error = StatementTimeoutError(
                f"no answer from the database within {scope.timeout}s; the connection "
                "was discarded"
            )
            error.__cause__ = exc
            return error
        return exc
    if not (cut or is_connection_error(exc)):
        return exc  # the server answered the COMMIT: it failed, nothing is uncertain
    return None


def resolved(
    event: Event, scope: ScopeState, exc: Exception, outcome: Outcome, *, finished: bool
) -> Exception | None:
    """Decide a lost COMMIT: None when it committed (the event succeeded: send its held
    sends, ack its result), else what to raise.

    Committed, but the handler itself was committing (``finished`` False): what it would
    have done next is unknown. Aborted: retried like any transient failure. Unresolved:
    a handler that may run again (``@idempotent``, or with an idempotency key) is
    retried; any other event is answered ``outcome_unknown``.

    :param outcome: what the database said (:func:`~socketio_dbctx.outcomes.resolve`).
    :param finished: the handler had returned (the COMMIT was the pipeline's).
    """
    logger.warning(
        "%s for sid %s: the connection was lost during COMMIT; outcome: %s",
        event.key,
        event.sid,
        outcome or "unknown",
    )
    if outcome == "committed" and finished:
        event.committed = True
        return None
    if outcome == "aborted":
        event.phase = "handler"  # nothing was applied: as safe to retry as a failed INSERT
        return exc
    if rerun_is_safe(event):
        event.unsettled = scope.held or []  # not None: an attempt's outcome is unknown
        return exc
    error = OutcomeUnknownError(
        "the connection was lost while COMMIT was on its way and the outcome could not "
        "be found out; check before trying again, or give the handler an idempotency key"
    )
    error.__cause__ = exc
    return error


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
