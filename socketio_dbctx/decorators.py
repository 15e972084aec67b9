"""Per-handler retry options: ``@no_retry``, ``@idempotent``, ``@retry_policy``."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .config import Settings

__all__ = ["OPTIONS_ATTR", "handler_options", "idempotent", "no_retry", "retry_policy"]

F = TypeVar("F", bound=Callable[..., Any])

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


def handler_options(handler: Callable[..., Any]) -> dict[str, Any]:
    """The options the decorators left on ``handler`` (a function or bound method)."""
    func = getattr(handler, "__func__", handler)
    return dict(getattr(func, OPTIONS_ATTR, {}))
