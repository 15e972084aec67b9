"""What a failed event or attempt becomes: the rules both pipelines (Flask's
:mod:`socketio_dbctx.middleware` and asyncio's :mod:`socketio_dbctx.aio.steps`) decide by.

- :func:`failed_attempt` and :func:`resolved`: a statement the watchdog cut, a COMMIT
  whose answer was lost (resolved, retried, or ``outcome_unknown``);
- :func:`still_unsettled`: a final failure after such a COMMIT;
- :func:`final_ack`, :func:`failure_outcome`, :func:`count_refused`: the ack, the
  metrics outcome, an event admission turned away;
- :func:`statement_timeout_of`: which statement timeout an event runs under.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from socketio.exceptions import ConnectionRefusedError as SocketIORefused
from sqlalchemy import exc as sa_exc

from .acks import error_code, error_payload, log_failure
from .errors import OutcomeUnknownError, StatementTimeoutError
from .retry import rerun_is_safe
from .transient import is_connection_error

if TYPE_CHECKING:
    from .context import ScopeState
    from .outcomes import Outcome
    from .pipeline import Event

__all__ = [
    "count_refused",
    "failed_attempt",
    "failure_outcome",
    "final_ack",
    "resolved",
    "statement_timeout_of",
    "still_unsettled",
]

logger = logging.getLogger(__name__)


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


def failure_outcome(event: Event, exc: Exception) -> str:
    """The metrics outcome of a failed event: ``busy`` (a pool checkout timeout also
    counted as one), else ``error``."""
    if error_code(exc) != "busy":
        return "error"
    if isinstance(exc, sa_exc.TimeoutError):
        event.state.metrics.pool_timeout()
    return "busy"


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


def statement_timeout_of(event: Event) -> float | None:
    """The event's statement timeout: its handler's ``@statement_timeout`` (``None``
    included), else the namespace's or the app's ``statement_timeout``."""
    options = event.options
    if "statement_timeout" in options:
        return options["statement_timeout"]  # type: ignore[no-any-return]
    return event.settings.statement_timeout


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
