"""The asyncio pipeline: the same steps as :mod:`socketio_dbctx.middleware`, awaited.

    errors -> admission -> metrics -> retry -> transaction -> idempotency
        -> user middleware -> handler

Each step decides as its Flask twin does, with the same functions: error codes and
payloads (:mod:`socketio_dbctx.acks`), what a failed attempt becomes
(:func:`~socketio_dbctx.settle.failed_attempt`,
:func:`~socketio_dbctx.settle.resolved`), retries
(:func:`~socketio_dbctx.retry.retry_after_async`), admission
(:class:`~socketio_dbctx.admission.Admission` with asyncio events) and keys
(:mod:`socketio_dbctx.keyed`, run in the session's greenlet). Only waiting and I/O are
awaited here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable

from socketio.exceptions import ConnectionRefusedError as SocketIORefused
from sqlalchemy.util import await_only, greenlet_spawn

from .. import keyed
from ..context import current_scope
from ..errors import BusyError, ContextSetupError, InvalidRequestError
from ..outcomes import resolve
from ..retry import retry_after_async
from ..settle import (
    count_refused,
    failed_attempt,
    failure_outcome,
    final_ack,
    resolved,
    statement_timeout_of,
    still_unsettled,
)
from .scope import AsyncScope, commit, release

if TYPE_CHECKING:
    from ..admission import Admission
    from ..decorators import KeyFunc
    from ..pipeline import Event
    from .state import AsyncState

__all__ = [
    "AsyncStep",
    "AsyncWrap",
    "admission",
    "call_handler",
    "errors",
    "idempotency",
    "metrics",
    "retry",
    "transaction",
]

logger = logging.getLogger(__name__)

AsyncStep = Callable[["Event"], Awaitable[Any]]
AsyncWrap = Callable[[AsyncStep], AsyncStep]

_NOTHING = object()


def _state(event: Event) -> AsyncState:
    return event.state  # type: ignore[return-value]  # an AsyncState in this pipeline


async def call_handler(event: Event) -> Any:
    """The end of every chain: check the argument count (the sid first, as
    python-socketio calls handlers), then call, and await, the handler."""
    spec, count = event.spec, len(event.args) + 1
    if not spec.accepts(count):
        raise InvalidRequestError(
            f"{event.name} takes {spec.describe_arity()} argument(s) with the sid, got {count}"
        )
    result = event.handler(event.sid, *event.args)
    if inspect.isawaitable(result):
        result = await result
    return result


def errors(rest: AsyncStep) -> AsyncStep:
    """Turn a failure into the ack: the namespace's ``error(exc)`` hook's value (run
    in a scope of its own, committed), else an error payload. A crashed connect refuses
    the client; refusals pass through."""

    async def step(event: Event) -> Any:
        try:
            result = await rest(event)
        except (ConnectionRefusedError, SocketIORefused, ContextSetupError):
            raise
        except Exception as exc:
            return await _answer(event, exc)
        return result

    return step


async def _answer(event: Event, exc: Exception) -> Any:
    owner = getattr(event.handler, "__self__", None)
    hook = getattr(owner, "error", None) if owner is not None else None
    ack = None
    if callable(hook):
        state = _state(event)
        try:
            async with AsyncScope(
                state.maker, event=event, label=event.key, defer=event.settings.defer_emits
            ) as scope:
                ack = hook(exc)
                if inspect.isawaitable(ack):
                    ack = await ack
                await commit(scope)
                held = scope.take_held()
            await release(held, state.metrics.after_commit_failed)
        except Exception:
            logger.exception("the error hook of %s raised while handling %s", event.key, exc)
            hook = None
    return final_ack(event, exc, ack, handled=callable(hook))


def admission(limits: Admission) -> AsyncWrap:
    """Hold the event until it is admitted (asyncio events, the same counting as the
    Flask pipeline); one turned away is counted ``busy`` here."""

    def wrap(rest: AsyncStep) -> AsyncStep:
        async def step(event: Event) -> Any:
            start = time.perf_counter()
            try:
                waiter = limits.enter(event.sid)
                if waiter is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(waiter.event.wait(), limits.timeout)
                    limits.admitted(waiter)
            except BusyError:
                count_refused(event, start)
                raise
            try:
                return await rest(event)
            finally:
                limits.leave(event.sid)

        return step

    return wrap


def metrics(rest: AsyncStep) -> AsyncStep:
    """Count the event and time it, retries included."""

    async def step(event: Event) -> Any:
        stats = event.state.metrics
        stats.started(event.key, event.namespace, event.name)
        start = time.perf_counter()
        outcome = "error"
        try:
            result = await rest(event)
            outcome = "ok"
            return result
        except Exception as exc:
            outcome = failure_outcome(event, exc)
            raise
        finally:
            stats.finished(event.key, time.perf_counter() - start, outcome)

    return step


def retry(rest: AsyncStep) -> AsyncStep:
    """Run the rest of the chain again after a transient failure."""

    async def step(event: Event) -> Any:
        try:
            return await rest(event)
        except Exception as exc:
            try:
                return await retry_after_async(event, rest, exc)
            except Exception as final:
                error = still_unsettled(event, final)
                if error is final:
                    raise
                raise error from final

    return step


def _green_sleep(seconds: float) -> None:
    # resolve() runs in a greenlet of the event loop: sleep without blocking the loop
    await_only(asyncio.sleep(seconds))


def transaction(rest: AsyncStep) -> AsyncStep:
    """A fresh ``AsyncSession``; commit on success, roll back on error, always closed;
    a lost COMMIT resolved as in the Flask pipeline."""

    async def step(event: Event) -> Any:
        event.phase = "handler"
        event.committed = False
        settings = event.settings
        state = _state(event)
        scope = AsyncScope(
            state.maker,
            event=event,
            label=event.key,
            defer=settings.defer_emits,
            timeout=statement_timeout_of(event),
        )
        result: Any = _NOTHING
        try:
            async with scope:
                result = await rest(event)
                if settings.commit_on_success:
                    await commit(scope)
                held = scope.take_held() if scope.held else None
        except Exception as exc:
            held = await _settle(event, scope, exc, finished=result is not _NOTHING)
        if held:
            await release(held, state.metrics.after_commit_failed)
        return result

    return step


async def _settle(event: Event, scope: AsyncScope, exc: Exception, *, finished: bool) -> Any:
    """The Flask pipeline's ``_settle``: raise what the attempt's failure becomes, or,
    for a lost COMMIT that committed, return the held sends to release."""
    error = failed_attempt(event, scope, exc)
    if error is not None:
        raise error
    outcome = await greenlet_spawn(resolve, scope.txids, _green_sleep) if scope.txids else None
    error = resolved(event, scope, exc, outcome, finished=finished)
    if error is not None:
        raise error
    return scope.held


def idempotency(default_key: KeyFunc | None) -> AsyncWrap:
    """Keys as in the Flask pipeline (:mod:`socketio_dbctx.keyed`), run in the
    session's greenlet."""

    def wrap(rest: AsyncStep) -> AsyncStep:
        async def step(event: Event) -> Any:
            if default_key is None and not event.options:  # most events: no key
                return await rest(event)
            if keyed.key_of(event, default_key) is None:
                return await rest(event)
            scope = current_scope()
            assert scope is not None
            session = scope.session
            stored = await session.run_sync(lambda sync: keyed.claim(event, sync))
            if stored is None:
                event.unsettled = None  # the key was free: no attempt committed it
            else:
                unsettled, event.unsettled = event.unsettled, None
                if unsettled:  # this event's own earlier attempt did commit
                    scope.hold(lambda: release(unsettled, event.state.metrics.after_commit_failed))
                return stored.ack
            try:
                result = await rest(event)
            except BaseException:
                await session.run_sync(lambda sync: keyed.failed(event, sync))
                raise
            await session.run_sync(lambda sync: keyed.succeeded(event, sync, result))
            return result

        return step

    return wrap
