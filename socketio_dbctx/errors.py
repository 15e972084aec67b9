"""The exceptions socketio_dbctx raises, and the error acks clients receive.

Exception tree::

    WebSocketContextError(Exception)                  base of everything raised here
     +- ContextSetupError                              no session/db configured, bad config
     +- InvalidRequestError(..., ValueError)           bad arguments from the client
     +- BusyError                                      admission or checkout timed out, draining
     +- StatementTimeoutError                          DBCTX_STATEMENT_TIMEOUT cut a statement
     +- DatabaseUnavailableError(..., RuntimeError)    connection problems
         +- RetryExhaustedError                        .attempts, .last_exception
         +- OutcomeUnknownError                        COMMIT sent, answer lost, unresolved

Which error code each exception is answered with lives in :mod:`socketio_dbctx.acks`.
"""

from __future__ import annotations

__all__ = [
    "BusyError",
    "ContextSetupError",
    "DatabaseUnavailableError",
    "InvalidRequestError",
    "OutcomeUnknownError",
    "RetryExhaustedError",
    "StatementTimeoutError",
    "WebSocketContextError",
]


class WebSocketContextError(Exception):
    """Base class of every exception raised by socketio_dbctx."""


class ContextSetupError(WebSocketContextError):
    """The extension is missing or misconfigured (no database, a bad config value)."""


class InvalidRequestError(WebSocketContextError, ValueError):
    """The client sent arguments the handler cannot accept.

    Raise it from a handler to answer ``invalid_request``; its message is shown to
    the client, so keep it free of internals.
    """


class BusyError(WebSocketContextError):
    """The event waited too long for admission or for a pooled connection, or the
    server is draining. Raise it from a handler to answer ``busy``.

    :param retry_after: seconds after which a retry has a fair chance; sent to the
        client as ``retry_after_ms`` (without it the library estimates one).
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StatementTimeoutError(WebSocketContextError):
    """A statement ran past the event's statement timeout and was cancelled; the
    transaction was rolled back. Never retried: the same work would time out again."""


class DatabaseUnavailableError(WebSocketContextError, RuntimeError):
    """The database could not be reached, or the connection was lost."""


class RetryExhaustedError(DatabaseUnavailableError):
    """A transient failure persisted through every retry.

    :param attempts: how many times the work ran.
    :param last_exception: the failure of the last attempt (also ``__cause__``).
    """

    def __init__(self, attempts: int, last_exception: BaseException) -> None:
        super().__init__(
            f"gave up after {attempts} attempt(s); last error: "
            f"{type(last_exception).__name__}: {last_exception}"
        )
        self.attempts = attempts
        self.last_exception = last_exception


class OutcomeUnknownError(DatabaseUnavailableError):
    """The connection was lost after COMMIT was sent, and whether it was applied could
    not be found out. Not retryable blindly: check, or use an idempotency key."""
