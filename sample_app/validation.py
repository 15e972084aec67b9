"""Strict validation of what clients send: anything unexpected is ``invalid_request``."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from socketio_dbctx import InvalidRequestError

from .money import PRICE_TICK, QTY_TICK, AmountError, parse_amount

SYMBOL = re.compile(r"[A-Z0-9.]{1,12}")
ORDER_KEYS = frozenset({"symbol", "side", "qty", "price"})
OPTIONAL_ORDER_KEYS = frozenset({"client_order_id"})
#: A client order id: 8-64 of letters, digits, ``-`` and ``_`` (a UUID fits).
CLIENT_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
#: Largest id a 64-bit integer column holds; more would overflow the driver.
MAX_ID = 2**63 - 1


def _amount(name: str, value: Any, tick: Decimal) -> Decimal:
    try:
        return parse_amount(name, value, tick)
    except AmountError as exc:
        raise InvalidRequestError(str(exc)) from None


def order_request(data: Any) -> dict[str, Any]:
    """Validate a ``place_order`` payload and return it normalised."""
    if not isinstance(data, dict):
        raise InvalidRequestError("order must be an object")
    keys = set(data)
    if not ORDER_KEYS <= keys <= ORDER_KEYS | OPTIONAL_ORDER_KEYS:
        missing = sorted(ORDER_KEYS - keys)
        extra = sorted(map(str, keys - ORDER_KEYS - OPTIONAL_ORDER_KEYS))
        raise InvalidRequestError(
            "order keys must be symbol, side, qty, price and optionally client_order_id"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)[:100]}" if extra else "")
        )
    symbol, side = data["symbol"], data["side"]
    if not isinstance(symbol, str) or not SYMBOL.fullmatch(symbol):
        raise InvalidRequestError("symbol must be 1-12 of A-Z, 0-9 and '.'")
    if side not in ("buy", "sell"):
        raise InvalidRequestError("side must be 'buy' or 'sell'")
    if "client_order_id" in data and client_order_id(data) is None:
        raise InvalidRequestError("client_order_id must be 8-64 of A-Z, a-z, 0-9, '-' and '_'")
    return {
        "symbol": symbol,
        "side": side,
        "qty": _amount("qty", data["qty"], QTY_TICK),
        "price": _amount("price", data["price"], PRICE_TICK),
    }


def client_order_id(data: Any) -> str | None:
    """The idempotency key of a ``place_order`` payload: its ``client_order_id``, if any.

    Anything that is not a well-formed id is no key: the handler then refuses it.
    """
    if isinstance(data, dict):
        value = data.get("client_order_id")
        if isinstance(value, str) and CLIENT_ORDER_ID.fullmatch(value):
            return value
    return None


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
