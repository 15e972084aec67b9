"""Uncertain commits: finding out whether a COMMIT whose answer was lost went through.

On PostgreSQL a transaction that wrote has an id (``txid_current_if_assigned()``,
asked just before COMMIT, and only by transactions that wrote: read-only events pay
nothing), and ``txid_status()`` on a fresh connection tells what became of it:
``committed``, ``aborted``, or ``in progress`` (the server has not finished yet: ask
again). Elsewhere, or when the database cannot be reached within the budget, the
outcome stays unknown (``None``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional

from sqlalchemy.engine import Connection, Engine

from .watchdog import WATCHDOG, Watch

__all__ = ["BUDGET", "Outcome", "resolve", "transaction_id"]

logger = logging.getLogger(__name__)

#: Seconds spent at most finding out what became of a lost COMMIT.
BUDGET = 2.5
_PAUSE = 0.2

Outcome = Optional[Literal["committed", "aborted"]]


def transaction_id(connection: Connection) -> int | None:
    """The PostgreSQL transaction id of ``connection``'s transaction, if it wrote
    anything (None otherwise, and on other backends)."""
    if connection.dialect.name != "postgresql":
        return None
    value = connection.exec_driver_sql("SELECT txid_current_if_assigned()").scalar()
    return int(value) if value is not None else None


def _status(engine: Engine, txid: int, seconds: float) -> str | None:
    # A new connection of its own, made the engine's way (its connect arguments and
    # connect listeners) in a pool of its own: the engine's may be full, or hold
    # connections to a server that stopped answering. Its query is watched like a
    # statement; its connect is bounded by the engine's connect_timeout.
    pool = engine.pool.recreate()
    try:
        raw = pool.connect()
        watch = Watch(max(seconds, 0.1), grace=0)
        try:
            WATCHDOG.register(watch)
            cursor = raw.cursor()
            try:
                watch.start(raw.dbapi_connection)
                cursor.execute(f"SELECT txid_status({int(txid)})")
                row = cursor.fetchone()
            finally:
                watch.stop()
                cursor.close()
        finally:
            WATCHDOG.unregister(watch)
            raw.invalidate()  # never kept: the pool is thrown away
            raw.close()
    finally:
        pool.dispose()
    return row[0] if row else None


def resolve(
    txids: Sequence[tuple[Engine, int]],
    sleep: Callable[[float], Any] = time.sleep,
    budget: float = BUDGET,
) -> Outcome:
    """What became of the transactions ``txids`` whose COMMIT lost its answer.

    :param txids: ``(engine, transaction id)`` of each connection that wrote.
    :param sleep: the async mode's sleep, between attempts.
    :param budget: seconds to keep asking while the server is unreachable or the
        transaction still in progress; an attempt is not begun when the last one took
        longer than what is left.
    :returns: ``"committed"`` when every one committed, ``"aborted"`` when every one
        was rolled back, else None (unknown).
    """
    if not txids:
        return None
    deadline = time.monotonic() + budget
    found: dict[int, str] = {}
    longest = 0.0
    while True:
        for index, (engine, txid) in enumerate(txids):
            left = deadline - time.monotonic()
            if index in found or left < longest:
                continue
            start = time.monotonic()
            try:
                status = _status(engine, txid, left)
            except Exception as exc:
                logger.info("could not ask about transaction %s yet: %s", txid, exc)
                continue
            finally:
                longest = max(longest, time.monotonic() - start)
            if status in ("committed", "aborted"):
                found[index] = status
        if len(found) == len(txids):
            outcomes = set(found.values())
            return outcomes.pop() if len(outcomes) == 1 else None  # type: ignore[return-value]
        if time.monotonic() + _PAUSE + longest >= deadline:
            return None
        sleep(_PAUSE)
