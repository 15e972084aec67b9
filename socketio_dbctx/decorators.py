"""Per-handler options: ``@no_retry``, ``@idempotent``, ``@retry_policy``,
``@statement_timeout``, ``@idempotency_key``."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .config import Settings
from .errors import ContextSetupError

__all__ = [
    "OPTIONS_ATTR",
    "KeyFunc",
    "handler_options",
    "idempotency_key",
    "idempotent",
    "no_retry",
    "retry_policy",
    "statement_timeout",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Finds the client's idempotency key in an event's payload: ``key(*payload)``.
KeyFunc = Callable[..., Any]

#: The attribute the decorators set on the handler function.
OPTIONS_ATTR = "__dbctx_options__"


def _mark(func: F, **options: Any) -> F:
    merged = {**getattr(func, OPTIONS_ATTR, {}), **options}
    setattr(func, OPTIONS_ATTR, merged)
    return func


def no_retry(func: F) -> F:
    """Never retry this handler, whatever the configuration says."""
    return _mark(func, no_retry=True)


def idempotent(func: F) -> F:
    """Running this handler twice is harmless: retry it even when the connection was
    lost during COMMIT, where the first attempt may already have been applied."""
    return _mark(func, idempotent=True)


def retry_policy(
    *, max_retries: int | None = None, retry_delay: float | None = None
) -> Callable[[F], F]:
    """Override the retry settings for one handler.

    :param max_retries: retries of a transient failure (attempts = 1 + this).
    :param retry_delay: backoff base in seconds.
    :raises ContextSetupError: for a negative or non-numeric value.
    """
    # validate now, at import time of the handler, not at the first event
    Settings().override({"max_retries": max_retries, "retry_delay": retry_delay})
    values = {"max_retries": max_retries, "retry_delay": retry_delay}

    def decorate(func: F) -> F:
        return _mark(func, **{k: v for k, v in values.items() if v is not None})

    return decorate


def statement_timeout(seconds: float | None) -> Callable[[F], F]:
    """Bound every statement of this handler's transaction on the server.

    Overrides the namespace attribute and ``DBCTX_STATEMENT_TIMEOUT``; ``None`` turns
    the bound off for this handler. Inside a namespace class that also sets a
    ``statement_timeout`` attribute, spell it ``@socketio_dbctx.statement_timeout(...)``:
    the attribute shadows the decorator's name in the class body.

    :param seconds: the bound, > 0, or None.
    :raises ContextSetupError: for a value that is not a positive number or None.
    """
    Settings(statement_timeout=seconds)  # validate now, at import time of the handler

    def decorate(func: F) -> F:
        return _mark(func, statement_timeout=seconds)

    return decorate


def idempotency_key(key: KeyFunc) -> Callable[[F], F]:
    """Make repeats of this handler with the same client key answer with the stored ack.

    ``key`` receives the event's payload (as the handler does, without ``self``) and
    returns the key: a non-empty string of at most 255 characters or an int; ``None``
    means the request has no key and runs as usual. The first successful run stores
    its ack in the same transaction as its work; a repeat of the key (same namespace
    and event, any client, any worker) gets that ack without running the handler.

    :param key: e.g. ``lambda data: data.get("request_id")``.
    """
    if not callable(key):
        raise ContextSetupError(
            f"idempotency_key() takes a function of the payload, got {key!r}; "
            "e.g. @idempotency_key(lambda data: data['request_id'])"
        )

    def decorate(func: F) -> F:
        return _mark(func, idempotency_key=key)

    return decorate


def handler_options(handler: Callable[..., Any]) -> dict[str, Any]:
    """The options the decorators left on ``handler`` (a function or bound method)."""
    func = getattr(handler, "__func__", handler)
    return dict(getattr(func, OPTIONS_ATTR, {}))
