"""Retries: run an event again, from the start, after a transient failure.

Backoff is exponential with full jitter,
``uniform(0, min(retry_max_delay, retry_delay * 2**n))``, driven by tenacity.
The first attempt runs outside tenacity so that the common case, success, costs
nothing; a failure is then replayed into tenacity as its first attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable

from tenacity import AsyncRetrying, RetryCallState, RetryError, Retrying, stop_after_attempt
from tenacity.wait import wait_random_exponential

from .errors import RetryExhaustedError
from .transient import is_rolled_back, is_transient

if TYPE_CHECKING:
    from .pipeline import Event, Step

__all__ = [
    "backoff",
    "max_retries_of",
    "rerun_is_safe",
    "retry_after",
    "retry_after_async",
    "should_retry",
]

logger = logging.getLogger(__name__)


def backoff(retry_delay: float, retry_max_delay: float) -> wait_random_exponential:
    """The full-jitter exponential wait used for every retry."""
    return wait_random_exponential(multiplier=retry_delay, max=retry_max_delay)


def should_retry(
    exc: BaseException, *, phase: str, idempotent: bool, committed: bool = False
) -> bool:
    """Whether a failure of an event in ``phase`` may be retried.

    A connection lost during COMMIT leaves the outcome unknown: only an
    idempotent handler may run again. A serialization failure or deadlock means
    the server rolled back, so it is safe at any phase, unless an earlier COMMIT
    of the same attempt went through (``committed``), which a rerun would repeat.
    """
    if not is_transient(exc):
        return False
    if idempotent:
        return True
    if committed:
        return False
    return phase != "commit" or is_rolled_back(exc)


def _retry_predicate(state: RetryCallState) -> bool:
    outcome = state.outcome
    if outcome is None or not outcome.failed:
        return False
    event: Event = state.args[0]
    exc = outcome.exception()
    assert exc is not None
    return should_retry(
        exc, phase=event.phase, idempotent=rerun_is_safe(event), committed=event.committed
    )


def _before_sleep(state: RetryCallState) -> None:
    event: Event = state.args[0]
    exc = state.outcome.exception() if state.outcome else None
    logger.warning(
        "retrying %s for sid %s (attempt %d of %d) in %.3fs after %s: %s",
        event.key,
        event.sid,
        state.attempt_number + 1,
        max_retries_of(event) + 1,
        state.upcoming_sleep,
        type(exc).__name__,
        exc,
    )
    event.state.metrics.retried(event.key)


def rerun_is_safe(event: Event) -> bool:
    """Whether running ``event`` again is harmless even after a COMMIT that may have
    gone through: its handler is ``@idempotent``, or the event has an idempotency key
    (a re-run finds the committed key and answers with its stored ack)."""
    return bool(event.options.get("idempotent", False)) or event.idempotency_key is not None


def max_retries_of(event: Event) -> int:
    """Retries allowed for ``event``: its handler's decorators, else the settings."""
    options = event.options
    if options.get("no_retry"):
        return 0
    return int(options.get("max_retries", event.settings.max_retries))


def _retrying_options(event: Event, first: Exception) -> dict[str, Any] | None:
    """tenacity's options for the retries of ``event`` after ``first``, or None when
    ``first`` may not be retried."""
    max_retries = max_retries_of(event)
    if max_retries == 0 or not should_retry(
        first, phase=event.phase, idempotent=rerun_is_safe(event), committed=event.committed
    ):
        return None
    settings = event.settings
    return {
        "stop": stop_after_attempt(max_retries + 1),
        "wait": backoff(
            event.options.get("retry_delay", settings.retry_delay), settings.retry_max_delay
        ),
        "retry": _retry_predicate,
        "before_sleep": _before_sleep,
    }


def _exhausted(event: Event, exhausted: RetryError) -> RetryExhaustedError:
    last = exhausted.last_attempt.exception()
    assert last is not None
    error = RetryExhaustedError(event.attempt, last)
    error.__cause__ = last
    return error


def retry_after(event: Event, rest: Step, first: Exception) -> Any:
    """``rest(event)`` failed with ``first``: when :func:`should_retry` allows it, run
    it again with backoff, up to :func:`max_retries_of` more times; else re-raise.
    (The first attempt runs in the pipeline's retry step, outside tenacity, so that
    success, the common case, costs nothing here.)

    :raises RetryExhaustedError: when every attempt failed transiently.
    """
    options = _retrying_options(event, first)
    if options is None:
        raise first
    replay: list[BaseException] = [first]

    def attempt(event: Event, rest: Step) -> Any:
        if replay:  # the first attempt already ran: give tenacity its outcome
            raise replay.pop()
        event.attempt += 1
        return rest(event)

    try:
        return Retrying(sleep=event.sleep, **options)(attempt, event, rest)
    except RetryError as exhausted:
        raise _exhausted(event, exhausted) from exhausted.last_attempt.exception()


async def retry_after_async(
    event: Event, rest: Callable[[Event], Awaitable[Any]], first: Exception
) -> Any:
    """:func:`retry_after` for an asyncio chain (tenacity's ``AsyncRetrying``, sleeping
    with ``asyncio.sleep``)."""
    options = _retrying_options(event, first)
    if options is None:
        raise first
    replay: list[BaseException] = [first]

    async def attempt(event: Event, rest: Callable[[Event], Awaitable[Any]]) -> Any:
        if replay:
            raise replay.pop()
        event.attempt += 1
        return await rest(event)

    try:
        return await AsyncRetrying(**options)(attempt, event, rest)
    except RetryError as exhausted:
        raise _exhausted(event, exhausted) from exhausted.last_attempt.exception()
