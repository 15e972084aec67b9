"""The exceptions socketio_dbctx raises, and the error acks clients receive.

Exception tree::

    WebSocketContextError(Exception)                  base of everything raised here
     +- ContextSetupError                              no session/db configured, bad config
     +- InvalidRequestError(..., ValueError)           bad arguments from the client
     +- BusyError                                      admission or pool checkout timed out
     +- DatabaseUnavailableError(..., RuntimeError)    connection problems
         +- RetryExhaustedError                        .attempts, .last_exception

Which error code each exception is answered with lives in :mod:`socketio_dbctx.acks`.
"""

from __future__ import annotations

__all__ = [
    "BusyError",
    "ContextSetupError",
    "DatabaseUnavailableError",
    "InvalidRequestError",
    "RetryExhaustedError",
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
    """The event waited too long for admission or for a pooled connection."""


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
