"""The trading desk's tables: orders and the trades that matching produces.

Prices and quantities are exact decimals (:mod:`sample_app.money`): a ``NUMERIC``
column where the database has an exact one, and a whole number of ticks in an
integer column on SQLite, whose ``NUMERIC`` is stored as a float.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import BigInteger, Dialect, Numeric, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from .money import PRICE_TICK, QTY_TICK, ZERO, to_wire


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

#: Order states: ``open`` rests on the book; ``filled`` and ``cancelled`` are final.
STATUSES = ("open", "filled", "cancelled")


class Exact(TypeDecorator[Decimal]):
    """A decimal with a fixed tick: ``NUMERIC(p, s)``, or integer ticks on SQLite.

    Values are :class:`~decimal.Decimal` multiples of ``tick`` on both sides (the
    validation refuses anything else before it gets here).
    """

    impl = Numeric
    cache_ok = True

    def __init__(self, tick: Decimal) -> None:
        self.tick = tick
        scale = -tick.as_tuple().exponent  # type: ignore[operator]
        super().__init__(precision=10 + scale, scale=scale, asdecimal=True)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(self.impl_instance)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        ticks = Decimal(value) / self.tick
        if ticks != ticks.to_integral_value():
            raise ValueError(f"{value} is not a multiple of {self.tick}")
        return int(ticks)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)) * self.tick
        return Decimal(value).quantize(self.tick)


class Order(db.Model):  # type: ignore[name-defined,misc]
    """A limit order: ``qty`` as placed, ``filled_qty`` traded so far.

    ``open_qty`` is what still rests on the book: ``qty - filled_qty`` while the order
    is ``open``, 0 once it is ``filled`` or ``cancelled``.
    """

    __tablename__ = "orders"
    __table_args__ = (
        # the matching query: open orders of one symbol and side, by price then time
        db.Index("ix_orders_book", "symbol", "side", "status", "price", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    symbol: Mapped[str] = mapped_column(db.String(12), index=True)
    side: Mapped[str] = mapped_column(db.String(4))
    qty: Mapped[Decimal] = mapped_column(Exact(QTY_TICK))
    filled_qty: Mapped[Decimal] = mapped_column(Exact(QTY_TICK), default=ZERO)
    price: Mapped[Decimal] = mapped_column(Exact(PRICE_TICK))
    status: Mapped[str] = mapped_column(db.String(10), default="open", index=True)
    created_at: Mapped[float] = mapped_column(default=time.time, index=True)

    @property
    def open_qty(self) -> Decimal:
        return self.qty - self.filled_qty if self.status == "open" else ZERO

    def to_dict(self) -> dict[str, Any]:
        return order_dict(
            self.id,
            self.symbol,
            self.side,
            self.qty,
            self.filled_qty,
            self.price,
            self.status,
            self.created_at,
        )


def order_dict(
    id: int,
    symbol: str,
    side: str,
    qty: Decimal,
    filled_qty: Decimal,
    price: Decimal,
    status: str,
    created_at: float,
) -> dict[str, Any]:
    """An order as clients see it: amounts as exact decimal strings."""
    open_qty = qty - filled_qty if status == "open" else ZERO
    return {
        "id": id,
        "symbol": symbol,
        "side": side,
        "qty": to_wire(qty),
        "filled_qty": to_wire(filled_qty),
        "open_qty": to_wire(open_qty),
        "price": to_wire(price),
        "status": status,
        "created_at": created_at,
    }


class Trade(db.Model):  # type: ignore[name-defined,misc]
    """One fill between a buy and a sell, at the resting order's price."""

    __tablename__ = "trades"

    id: Mapped[int] = mapped_column(primary_key=True)
    symbol: Mapped[str] = mapped_column(db.String(12), index=True)
    qty: Mapped[Decimal] = mapped_column(Exact(QTY_TICK))
    price: Mapped[Decimal] = mapped_column(Exact(PRICE_TICK))
    buy_order_id: Mapped[int] = mapped_column(db.ForeignKey("orders.id"), index=True)
    sell_order_id: Mapped[int] = mapped_column(db.ForeignKey("orders.id"), index=True)
    #: the side of the incoming order that crossed the book
    taker_side: Mapped[str] = mapped_column(db.String(4))
    created_at: Mapped[float] = mapped_column(default=time.time, index=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "symbol": self.symbol,
            "qty": to_wire(self.qty),
            "price": to_wire(self.price),
            "buy_order_id": self.buy_order_id,
            "sell_order_id": self.sell_order_id,
            "taker_side": self.taker_side,
            "created_at": self.created_at,
        }
