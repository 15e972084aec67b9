"""The rules of a keyed event (see :mod:`socketio_dbctx.idempotency`), shared by the
Flask pipeline's ``idempotency`` step and the asyncio one, which runs them in its
session's greenlet (``AsyncSession.run_sync``).

:func:`claim` before the handler; then :func:`succeeded` with its result, or
:func:`failed`. A handler that committed itself has already committed its claim: its
ack is then stored, or its key released, in a transaction of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .idempotency import Stored, read_key

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .decorators import KeyFunc
    from .pipeline import Event

__all__ = ["claim", "event_name", "failed", "key_of", "succeeded"]


def key_of(event: Event, default_key: KeyFunc | None) -> str | None:
    """Read the event's idempotency key (None: it has none), and remember it on the
    event.

    :raises InvalidRequestError: for a key of the wrong kind.
    """
    key_func = event.options.get("idempotency_key", default_key)
    if key_func is None:
        return None
    key = event.idempotency_key = read_key(key_func, event.args)
    return key


def event_name(event: Event) -> str:
    """The name keys are stored under: a catch-all handler's real event name."""
    if event.name == "*" and event.args and isinstance(event.args[0], str):
        return event.args[0]
    return event.name


def claim(event: Event, session: Session) -> Stored | None:
    """Claim the event's key: None when this run owns it, else the stored ack."""
    assert event.idempotency_key is not None
    return event.state.keys.claim(
        session, event.namespace, event_name(event), event.idempotency_key
    )


def succeeded(event: Event, session: Session, result: Any) -> None:
    """Store the ack of the run that claimed the key."""
    assert event.idempotency_key is not None
    event.state.keys.store(
        session,
        event.namespace,
        event_name(event),
        event.idempotency_key,
        result,
        separately=event.committed,
    )


def failed(event: Event, session: Session) -> None:
    """The run that claimed the key failed: its claim goes with the rollback, unless
    the handler committed it itself; then it is released here."""
    if event.committed and event.idempotency_key is not None:
        event.state.keys.release(
            session, event.namespace, event_name(event), event.idempotency_key
        )
