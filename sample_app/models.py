"""The trading desk's tables: orders and the trades that matching produces."""

from __future__ import annotations

import time
from typing import Any

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

#: Order states: ``open`` rests on the book; ``filled`` and ``cancelled`` are final.
STATUSES = ("open", "filled", "cancelled")


class Order(db.Model):  # type: ignore[name-defined,misc]
    """A limit order. ``qty`` is what is still open: fills reduce it, down to 0 when filled."""

    __tablename__ = "orders"
    __table_args__ = (
        # the matching query: open orders of one symbol and side, by price then time
        db.Index("ix_orders_book", "symbol", "side", "status", "price", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    symbol: Mapped[str] = mapped_column(db.String(12), index=True)
    side: Mapped[str] = mapped_column(db.String(4))
    qty: Mapped[float]
    price: Mapped[float]
    status: Mapped[str] = mapped_column(db.String(10), default="open", index=True)
    created_at: Mapped[float] = mapped_column(default=time.time, index=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "symbol": self.symbol,
            "side": self.side,
            "qty": self.qty,
            "price": self.price,
            "status": self.status,
            "created_at": self.created_at,
        }


class Trade(db.Model):  # type: ignore[name-defined,misc]
    """One fill between a buy and a sell, at the resting order's price."""

    __tablename__ = "trades"

    id: Mapped[int] = mapped_column(primary_key=True)
    symbol: Mapped[str] = mapped_column(db.String(12), index=True)
    qty: Mapped[float]
    price: Mapped[float]
    buy_order_id: Mapped[int] = mapped_column(db.ForeignKey("orders.id"), index=True)
    sell_order_id: Mapped[int] = mapped_column(db.ForeignKey("orders.id"), index=True)
    #: the side of the incoming order that crossed the book
    taker_side: Mapped[str] = mapped_column(db.String(4))
    created_at: Mapped[float] = mapped_column(default=time.time, index=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "symbol": self.symbol,
            "qty": self.qty,
            "price": self.price,
            "buy_order_id": self.buy_order_id,
            "sell_order_id": self.sell_order_id,
            "taker_side": self.taker_side,
            "created_at": self.created_at,
        }
