"""Price-time priority matching.

An incoming buy crosses the open sells of its symbol whose price is <= its limit,
lowest price first and, at one price, oldest first; an incoming sell crosses the open
buys priced >= its limit, highest first. Each fill is a :class:`Trade` at the resting
order's price and adds to ``filled_qty`` on both sides; an order whose ``filled_qty``
reaches its ``qty`` is ``filled``. Whatever is left of the incoming order rests on the
book as ``open``. Amounts are exact decimals, so fills always sum to what was placed.

One symbol's book is matched by one event at a time, and the lock is held until the
transaction ends, through the COMMIT socketio_dbctx runs after the handler returns:

* PostgreSQL: a transaction-level advisory lock on the symbol, taken *after* the new
  order's INSERT (which needs no lock) and released by COMMIT or ROLLBACK; it also
  serialises several worker processes sharing the database. A wait longer than
  :data:`LOCK_TIMEOUT` is cancelled by the server (``lock_timeout``) and answered
  ``busy`` with a ``retry_after_ms`` hint.
* Other databases (SQLite): a lock per symbol stripe in this process, taken before the
  first statement (a blocking SQLite call would stall an eventlet or gevent hub).

Matching costs a fixed number of round trips whatever the number of fills: one
SELECT ... FOR UPDATE per :data:`BATCH` resting orders, one UPDATE (executemany) for
every order it touched and one INSERT of its trades.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, event, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, SessionTransaction

from socketio_dbctx import BusyError

from .models import Order, Trade, db, order_dict

__all__ = ["LOCK_TIMEOUT", "Cancelled", "Match", "book_lock", "cancel", "hold", "place"]

#: Locks per process (SQLite); symbols share them by hash.
STRIPES = 64
#: Seconds an order waits for its book before the client gets ``busy``.
LOCK_TIMEOUT = 3.0
#: Resting orders read per round of matching.
BATCH = 100
#: PostgreSQL's SQLSTATE for a lock wait cancelled by ``lock_timeout``.
LOCK_NOT_AVAILABLE = "55P03"

_locks = [threading.Lock() for _ in range(STRIPES)]
_HELD = "sample_app.locks"


def book_lock(symbol: str) -> threading.Lock:
    """The process-local lock of ``symbol``'s book (databases without advisory locks)."""
    return _locks[zlib.crc32(symbol.encode()) % STRIPES]


def hold(session: Session, lock: threading.Lock, timeout: float) -> None:
    """Acquire ``lock`` and keep it until ``session``'s transaction ends (commit or
    rollback).

    :raises BusyError: when the lock is not free within ``timeout`` seconds (the
        client gets a retryable ``busy`` ack).
    """
    if not lock.acquire(timeout=timeout):
        raise BusyError("the order book is busy, try again", retry_after=0.5)
    try:
        session.connection()  # begin the transaction whose end releases the lock
    except BaseException:
        lock.release()
        raise
    session.info.setdefault(_HELD, []).append(lock)


@event.listens_for(db.session, "after_transaction_end")
def _release_locks(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the whole transaction, not a savepoint
        for lock in session.info.pop(_HELD, ()):
            lock.release()


def _advisory_lock(session: Session, symbol: str) -> None:
    try:
        # one round trip: the bound on the wait, then the lock (held to COMMIT/ROLLBACK)
        session.execute(
            text(
                "SELECT set_config('lock_timeout', :timeout, true), "
                "pg_advisory_xact_lock(hashtext(:symbol))"
            ),
            {"timeout": f"{int(LOCK_TIMEOUT * 1000)}ms", "symbol": symbol},
        )
    except OperationalError as exc:
        if getattr(exc.orig, "pgcode", None) == LOCK_NOT_AVAILABLE:
            raise BusyError(
                f"the {symbol} book stayed busy for {LOCK_TIMEOUT:g} s, try again",
                retry_after=0.5,
            ) from exc
        raise


@dataclass
class Match:
    """What placing one order did (all as client dicts, ready to broadcast)."""

    order: dict[str, Any]
    trades: list[dict[str, Any]] = field(default_factory=list)
    #: resting orders whose ``filled_qty``/``status`` changed, in fill order
    touched: list[dict[str, Any]] = field(default_factory=list)


def place(session: Session, symbol: str, side: str, qty: Decimal, price: Decimal) -> Match:
    """Store a new order and match it against the book. Nothing is committed here."""
    postgres = session.get_bind().dialect.name == "postgresql"
    if not postgres:
        hold(session, book_lock(symbol), LOCK_TIMEOUT)
    now = time.time()
    order = Order(
        symbol=symbol,
        side=side,
        qty=qty,
        filled_qty=Decimal(0),
        price=price,
        status="open",
        created_at=now,
    )
    session.add(order)
    session.flush()  # the INSERT needs no lock: nobody sees the order before COMMIT
    order_id = order.id
    if postgres:
        _advisory_lock(session, symbol)
    if side == "buy":
        crosses, best_first, opposite = Order.price <= price, Order.price.asc(), "sell"
    else:
        crosses, best_first, opposite = Order.price >= price, Order.price.desc(), "buy"
    query = (
        select(
            Order.id,
            Order.side,
            Order.qty,
            Order.filled_qty,
            Order.price,
            Order.created_at,
        )
        .where(Order.symbol == symbol, Order.side == opposite, Order.status == "open", crosses)
        .order_by(best_first, Order.created_at, Order.id)
        .limit(BATCH)
        .with_for_update()
    )
    remaining = qty
    fills: list[dict[str, Any]] = []  # UPDATE parameters of the resting orders
    touched: list[dict[str, Any]] = []
    trades: list[Trade] = []
    seen: set[int] = set()
    while remaining > 0:
        rows = [row for row in session.execute(query) if row.id not in seen]
        if not rows:
            break
        for row in rows:
            seen.add(row.id)
            fill = min(remaining, row.qty - row.filled_qty)
            remaining -= fill
            filled = row.filled_qty + fill
            status = "filled" if filled == row.qty else "open"
            fills.append({"b_id": row.id, "b_filled": filled, "b_status": status})
            touched.append(
                order_dict(row.id, symbol, row.side, row.qty, filled, row.price, status,
                           row.created_at)
            )  # fmt: skip
            buy, sell = (order_id, row.id) if side == "buy" else (row.id, order_id)
            trades.append(
                Trade(
                    symbol=symbol,
                    qty=fill,
                    price=row.price,
                    buy_order_id=buy,
                    sell_order_id=sell,
                    taker_side=side,
                    created_at=now,
                )
            )
            if remaining == 0:
                break
        if remaining > 0 and fills:
            _apply(session, fills)  # this batch is used up: the next SELECT skips it
            fills = []
    _apply(session, fills)
    order.filled_qty = qty - remaining
    order.status = "filled" if remaining == 0 else "open"
    session.add_all(trades)
    session.flush()  # the order's UPDATE and the trades' INSERT
    return Match(order.to_dict(), [t.to_dict() for t in trades], touched)


_FILL = (
    update(Order)
    .where(Order.id == bindparam("b_id"))
    .values(filled_qty=bindparam("b_filled"), status=bindparam("b_status"))
)


def _apply(session: Session, fills: list[dict[str, Any]]) -> None:
    if fills:
        # Core executemany: one batch for every resting order touched
        session.connection().execute(_FILL, fills)


@dataclass
class Cancelled:
    """What :func:`cancel` did: ``ok`` False when the order was no longer open."""

    ok: bool
    order: dict[str, Any]


def cancel(session: Session, order_id: int) -> Cancelled | None:
    """Cancel an open order; ``None`` when there is no order with that id.

    One conditional UPDATE: an order that matching filled a moment ago (or that
    another client cancelled) is not open any more, stays as it is, and comes back
    with ``ok=False``: a race every trader meets, not an error.
    """
    result = session.execute(
        update(Order)
        .where(Order.id == order_id, Order.status == "open")
        .values(status="cancelled")
        .execution_options(synchronize_session=False)
    )
    order = session.get(Order, order_id, populate_existing=True)
    if order is None:
        return None
    return Cancelled(result.rowcount == 1, order.to_dict())  # type: ignore[attr-defined]
