"""Work tied to the end of a session's transaction.

* :func:`after_commit` queues a callback (a broadcast) that runs only once the
  transaction has committed, so clients never hear of an order that could still be
  rolled back. On rollback the callbacks are dropped; when socketio_dbctx retries
  the event, the handler runs again and queues them again.
* :func:`hold` takes a lock until the transaction ends, commit or rollback. The
  order book stays locked through the COMMIT that socketio_dbctx runs after the
  handler returns, so no other order can match against a stale book.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from socketio_dbctx import BusyError

__all__ = ["after_commit", "hold"]

logger = logging.getLogger("sample_app")

_CALLBACKS = "sample_app.after_commit"
_LOCKS = "sample_app.locks"


def after_commit(session: Session, callback: Callable[[], Any]) -> None:
    """Run ``callback()`` after ``session``'s current transaction commits."""
    session.info.setdefault(_CALLBACKS, []).append(callback)


def hold(session: Session, lock: threading.Lock, timeout: float) -> None:
    """Acquire ``lock`` and keep it until ``session``'s transaction ends.

    :raises BusyError: when the lock is not free within ``timeout`` seconds (the
        client gets a retryable ``busy`` ack).
    """
    if not lock.acquire(timeout=timeout):
        raise BusyError("the order book is busy, try again")
    try:
        session.connection()  # begin the transaction whose end releases the lock
    except BaseException:
        lock.release()
        raise
    session.info.setdefault(_LOCKS, []).append(lock)


@event.listens_for(Session, "after_commit")
def _run_callbacks(session: Session) -> None:
    for callback in session.info.pop(_CALLBACKS, ()):
        try:
            callback()
        except Exception:  # the data is committed: a failed broadcast must not undo the ack
            logger.exception("after-commit callback %r failed", callback)


@event.listens_for(Session, "after_transaction_end")
def _transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:  # a savepoint, not the whole transaction
        return
    session.info.pop(_CALLBACKS, None)  # rolled back (after a commit the list is gone)
    for lock in session.info.pop(_LOCKS, ()):
        lock.release()
