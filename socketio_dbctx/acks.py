"""Error acks: the codes, their messages, and which exception gets which code.

Every failed event the client asked an ack for is answered with an
:class:`~socketio_dbctx.shapes.ErrorAck`, ``{"error": code, "message": text,
"retryable": bool}``, where ``code`` is one of :data:`ERROR_CODES`; a ``busy`` ack also
carries ``retry_after_ms``. This module is
the one place that maps exceptions to codes, texts and log levels.
"""

from __future__ import annotations

import logging

from sqlalchemy import exc as sa_exc

from .errors import (
    BusyError,
    DatabaseUnavailableError,
    InvalidRequestError,
    OutcomeUnknownError,
    RetryExhaustedError,
    StatementTimeoutError,
)
from .shapes import ErrorAck
from .throttle import Decision, LogThrottle
from .transient import is_connection_error, is_statement_timeout

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "ERROR_CODES",
    "MESSAGES",
    "error_code",
    "error_payload",
    "log_failure",
]

logger = logging.getLogger(__name__)

#: Safe human text per error code; exception text never reaches the client by default.
MESSAGES = {
    "invalid_request": "The request was not valid.",
    "busy": "The server is busy; try again shortly.",
    "timeout": "The database took too long; nothing was applied.",
    "db_unavailable": "The database is unavailable right now.",
    "outcome_unknown": "The connection was lost while saving; it may or may not be applied.",
    "internal_error": "The server could not process this event.",
}

#: The values of the ``error`` key of an error ack.
ERROR_CODES = tuple(MESSAGES)


def error_code(exc: BaseException) -> str:
    """Map an exception to the ``error`` key of an error ack."""
    if isinstance(exc, InvalidRequestError):
        return "invalid_request"
    if isinstance(exc, (BusyError, sa_exc.TimeoutError)):
        return "busy"
    if isinstance(exc, StatementTimeoutError) or is_statement_timeout(exc):
        return "timeout"
    if isinstance(exc, OutcomeUnknownError):
        return "outcome_unknown"
    if isinstance(exc, DatabaseUnavailableError) or is_connection_error(exc):
        return "db_unavailable"
    return "internal_error"


#: ``retry_after_ms`` of a ``busy`` ack when nobody knows better.
DEFAULT_RETRY_AFTER = 0.5


def error_payload(
    exc: BaseException, *, expose: bool, retry_after: float | None = None
) -> ErrorAck:
    """The ack for a failed event.

    :param exc: what the event raised.
    :param expose: add the exception type and text under ``"detail"``
        (``DBCTX_EXPOSE_ERRORS``; for development only).
    :param retry_after: for ``busy``, the caller's estimate in seconds of when a retry
        may be admitted; a :class:`~socketio_dbctx.BusyError`'s own hint wins.
    """
    code = error_code(exc)
    # An InvalidRequestError is written for the client (by us or by the handler).
    message = str(exc) if isinstance(exc, InvalidRequestError) and str(exc) else MESSAGES[code]
    payload: ErrorAck = {
        "error": code,
        "message": message,
        "retryable": code == "busy" or isinstance(exc, RetryExhaustedError),
    }
    if code == "busy":
        hint = getattr(exc, "retry_after", None)
        if hint is None:
            hint = DEFAULT_RETRY_AFTER if retry_after is None else retry_after
        payload["retry_after_ms"] = max(1, round(hint * 1000))
    if expose:
        payload["detail"] = f"{type(exc).__name__}: {exc}"
    return payload


def log_failure(
    key: str, sid: str | None, exc: BaseException, throttle: LogThrottle | None = None
) -> None:
    """Log a failed event at a level that fits its cause, without flooding.

    The first failure of each ``(key, error class)`` is logged, with its traceback for
    real failures; then at most one summary line per
    :data:`~socketio_dbctx.throttle.SUMMARY_INTERVAL` ("... and 1523 more like it in
    the last 10 s"). With this logger enabled for DEBUG, every failure is logged in full.

    :param throttle: whose counts to use (each app has its own); default: the process's.
    """
    code = error_code(exc)
    if code == "invalid_request":
        level, what, trace = logging.INFO, "rejected", False
    elif code in ("busy", "timeout"):
        level, what, trace = logging.WARNING, f"answered {code}", False
    else:
        level, what, trace = logging.ERROR, f"failed ({code})", True
    if not logger.isEnabledFor(level):
        return
    if logger.isEnabledFor(logging.DEBUG):
        decision = _EVERY
    else:
        decision = (throttle or _THROTTLE).occurred((key, type(exc)))
        if not decision.log:
            return
    if decision.first:
        logger.log(
            level, "%s for sid %s %s: %s", key, sid, what, exc, exc_info=exc if trace else None
        )
    else:
        logger.log(
            level,
            "%s for sid %s %s: %s ... and %d more like it in the last %.0f s",
            key,
            sid,
            what,
            type(exc).__name__,
            decision.more,
            decision.seconds,
        )


_THROTTLE = LogThrottle()
_EVERY = Decision(True, True)
