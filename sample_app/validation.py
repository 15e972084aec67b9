"""Strict validation of what clients send: anything unexpected is ``invalid_request``."""

from __future__ import annotations

import math
import re
from typing import Any

from socketio_dbctx import InvalidRequestError

SYMBOL = re.compile(r"[A-Z0-9.]{1,12}")
ORDER_KEYS = frozenset({"symbol", "side", "qty", "price"})
MAX_NUMBER = 1e9
#: Largest id a 64-bit integer column holds; more would overflow the driver.
MAX_ID = 2**63 - 1


def _number(name: str, value: Any) -> float:
    # bool is an int subclass; True is not a quantity
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number")
    if not math.isfinite(value) or not 0 < value <= MAX_NUMBER:
        raise InvalidRequestError(f"{name} must be finite, > 0 and <= 1e9")
    return float(value)


def order_request(data: Any) -> dict[str, Any]:
    """Validate a ``place_order`` payload and return it normalised."""
    if not isinstance(data, dict):
        raise InvalidRequestError("order must be an object")
    keys = set(data)
    if keys != ORDER_KEYS:
        missing, extra = sorted(ORDER_KEYS - keys), sorted(map(str, keys - ORDER_KEYS))
        raise InvalidRequestError(
            "order keys must be symbol, side, qty, price"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)[:100]}" if extra else "")
        )
    symbol, side = data["symbol"], data["side"]
    if not isinstance(symbol, str) or not SYMBOL.fullmatch(symbol):
        raise InvalidRequestError("symbol must be 1-12 of A-Z, 0-9 and '.'")
    if side not in ("buy", "sell"):
        raise InvalidRequestError("side must be 'buy' or 'sell'")
    return {
        "symbol": symbol,
        "side": side,
        "qty": _number("qty", data["qty"]),
        "price": _number("price", data["price"]),
    }


def list_request(data: Any, what: str = "list_orders") -> tuple[str | None, int]:
    """Validate a ``list_orders`` or ``list_trades`` payload.

    ``None`` or ``{"symbol"?, "limit"?}``; returns ``(symbol or None, limit)``.
    """
    if data is None:
        return None, 100
    if not isinstance(data, dict) or not set(data) <= {"symbol", "limit"}:
        raise InvalidRequestError(f"{what} takes nothing, or {{symbol, limit}}")
    symbol = data.get("symbol")
    if symbol is not None and (not isinstance(symbol, str) or not SYMBOL.fullmatch(symbol)):
        raise InvalidRequestError("symbol must be 1-12 of A-Z, 0-9 and '.'")
    limit = data.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 500:
        raise InvalidRequestError("limit must be an integer from 1 to 500")
    return symbol, limit


def order_id(value: Any) -> int:
    """Validate an order id."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise InvalidRequestError("order_id must be a positive integer")
    return value
