"""Structured error acks: what a client receives when its event failed."""

from __future__ import annotations

import logging
from typing import Any

from .errors import InvalidRequestError, RetryExhaustedError
from .transient import error_code

__all__ = ["MESSAGES", "error_payload", "log_failure"]

logger = logging.getLogger("socketio_dbctx")

#: Safe human text per error code; exception text never reaches the client by default.
MESSAGES = {
    "invalid_request": "The request was not valid.",
    "busy": "The server is busy; try again shortly.",
    "db_unavailable": "The database is unavailable right now.",
    "internal_error": "The server could not process this event.",
}


def error_payload(exc: BaseException, *, expose: bool) -> dict[str, Any]:
    """The ack for a failed event.

    :param exc: what the event raised.
    :param expose: add the exception type and text under ``"detail"``
        (``DBCTX_EXPOSE_ERRORS``; for development only).
    """
    code = error_code(exc)
    # An InvalidRequestError is written for the client (by us or by the handler).
    message = str(exc) if isinstance(exc, InvalidRequestError) and str(exc) else MESSAGES[code]
    payload: dict[str, Any] = {
        "error": code,
        "message": message,
        "retryable": code == "busy" or isinstance(exc, RetryExhaustedError),
    }
    if expose:
        payload["detail"] = f"{type(exc).__name__}: {exc}"
    return payload


def log_failure(key: str, sid: str | None, exc: BaseException) -> None:
    """Log a failed event at a level that fits its cause; tracebacks for real failures."""
    code = error_code(exc)
    if code == "invalid_request":
        logger.info("%s from sid %s rejected: %s", key, sid, exc)
    elif code == "busy":
        logger.warning("%s for sid %s answered busy: %s", key, sid, exc)
    else:
        logger.error("%s for sid %s failed (%s)", key, sid, code, exc_info=exc)
