"""The trading desk's tables."""

from __future__ import annotations

import time

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    symbol: Mapped[str] = mapped_column(db.String(12), index=True)
    side: Mapped[str] = mapped_column(db.String(4))
    qty: Mapped[float]
    price: Mapped[float]
    status: Mapped[str] = mapped_column(db.String(10), default="open", index=True)
    created_at: Mapped[float] = mapped_column(default=time.time)

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "symbol": self.symbol,
            "side": self.side,
            "qty": self.qty,
            "price": self.price,
            "status": self.status,
            "created_at": self.created_at,
        }
