"""Price-time priority matching.

An incoming buy crosses the open sells of its symbol whose price is <= its limit,
lowest price first and, at one price, oldest first; an incoming sell crosses the open
buys priced >= its limit, highest first. Each fill is a :class:`Trade` at the resting
order's price. Fills reduce ``qty`` on both sides; an order whose ``qty`` reaches 0 is
``filled``. Whatever is left of the incoming order rests on the book as ``open``.

One symbol's book is matched by one event at a time: a lock per symbol stripe in this
process (held until the transaction ends, see :func:`hold`) and, on
PostgreSQL, a transaction-level advisory lock, so several workers sharing the
database never match against the same resting order twice.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass, field

from sqlalchemy import event, select, text, update
from sqlalchemy.orm import Session, SessionTransaction

from socketio_dbctx import BusyError

from .models import Order, Trade, db

__all__ = ["Match", "book_lock", "cancel", "hold", "place"]

#: Locks per process; symbols share them by hash.
STRIPES = 64
#: Seconds an order waits for its book before the client gets ``busy``.
LOCK_TIMEOUT = 10.0
#: Resting orders read per round of matching.
BATCH = 50

_locks = [threading.Lock() for _ in range(STRIPES)]


_HELD = "sample_app.locks"


def book_lock(symbol: str) -> threading.Lock:
    """The process-local lock of ``symbol``'s book."""
    return _locks[zlib.crc32(symbol.encode()) % STRIPES]


def hold(session: Session, lock: threading.Lock, timeout: float) -> None:
    """Acquire ``lock`` and keep it until ``session``'s transaction ends (commit or
    rollback), so the book stays locked through the COMMIT socketio_dbctx runs after
    the handler returns and no other order matches against a stale book.

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
    session.info.setdefault(_HELD, []).append(lock)


@event.listens_for(db.session, "after_transaction_end")
def _release_locks(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the whole transaction, not a savepoint
        for lock in session.info.pop(_HELD, ()):
            lock.release()


@dataclass
class Match:
    """What placing one order did."""

    order: Order
    trades: list[Trade] = field(default_factory=list)
    #: resting orders whose ``qty``/``status`` changed, in fill order
    touched: list[Order] = field(default_factory=list)


def _lock_book(session: Session, symbol: str) -> None:
    hold(session, book_lock(symbol), LOCK_TIMEOUT)
    if session.get_bind().dialect.name == "postgresql":
        # across worker processes; released by the COMMIT or ROLLBACK
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": symbol})


def place(session: Session, symbol: str, side: str, qty: float, price: float) -> Match:
    """Store a new order and match it against the book. Nothing is committed here."""
    _lock_book(session, symbol)
    now = time.time()
    order = Order(symbol=symbol, side=side, qty=qty, price=price, status="open", created_at=now)
    session.add(order)
    session.flush()
    match = Match(order)
    if side == "buy":
        crosses, best_first = Order.price <= price, Order.price.asc()
        opposite = "sell"
    else:
        crosses, best_first = Order.price >= price, Order.price.desc()
        opposite = "buy"
    query = (
        select(Order)
        .where(Order.symbol == symbol, Order.side == opposite, Order.status == "open", crosses)
        .order_by(best_first, Order.created_at, Order.id)
        .limit(BATCH)
        .with_for_update()
    )
    while order.qty > 0:
        resting_orders = session.scalars(query).all()
        if not resting_orders:
            break
        for resting in resting_orders:
            fill = min(order.qty, resting.qty)
            # x - x is exactly 0.0, so the smaller side always ends at exactly 0
            order.qty -= fill
            resting.qty -= fill
            if resting.qty == 0:
                resting.status = "filled"
            buy, sell = (order, resting) if side == "buy" else (resting, order)
            trade = Trade(
                symbol=symbol,
                qty=fill,
                price=resting.price,
                buy_order_id=buy.id,
                sell_order_id=sell.id,
                taker_side=side,
                created_at=now,
            )
            session.add(trade)
            match.trades.append(trade)
            match.touched.append(resting)
            if order.qty == 0:
                order.status = "filled"
                break
        session.flush()
    return match


def cancel(session: Session, order_id: int) -> Order | None:
    """Cancel an open order; ``None`` when there is no open order with that id.

    One conditional UPDATE: an order that matching filled a moment ago (or that
    another client cancelled) is not open any more, and stays as it is.
    """
    result = session.execute(
        update(Order)
        .where(Order.id == order_id, Order.status == "open")
        .values(status="cancelled")
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    order = session.get(Order, order_id, populate_existing=True)
    return order
