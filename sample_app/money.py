"""Exact amounts: prices and quantities are decimals on a fixed tick.

* price: tick ``0.01``, minimum ``0.01``, maximum ``1000000000``;
* quantity: tick ``0.0001``, minimum ``0.0001``, maximum ``1000000000``.

On the wire an amount is a string (``"0.3"``) or a JSON number. A number is read as
its shortest decimal representation, the one JSON and JavaScript print: ``0.3`` is
``0.3``, and JavaScript's ``0.1 + 0.2`` arrives as ``0.30000000000000004``, which is
off the tick and refused, never rounded. Answers carry amounts as exact strings
without trailing zeros (``"100"``, ``"0.3"``), so fills always sum exactly.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["MAX_AMOUNT", "PRICE_TICK", "QTY_TICK", "ZERO", "parse_amount", "to_wire"]

PRICE_TICK = Decimal("0.01")
QTY_TICK = Decimal("0.0001")
MAX_AMOUNT = Decimal(1_000_000_000)
ZERO = Decimal(0)

#: digits, an optional fraction; no sign, exponent, spaces or "NaN" (at most 32 chars)
_TEXT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,20})?")


class AmountError(ValueError):
    """Why a value is not an acceptable amount (the message is for the client)."""


def parse_amount(name: str, value: Any, tick: Decimal) -> Decimal:
    """``value`` (a JSON string or number) as an exact multiple of ``tick``.

    :raises AmountError: for a wrong type, a malformed string, a value that is not
        finite, below one tick, above :data:`MAX_AMOUNT` or off the tick.
    """
    # bool is an int subclass; True is not an amount
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise AmountError(f"{name} must be a decimal string or a number")
    if isinstance(value, str):
        if not _TEXT.fullmatch(value):
            raise AmountError(f"{name} must be a plain decimal such as '12.5'")
        amount = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise AmountError(f"{name} must be finite")
        try:
            amount = Decimal(repr(value))  # the shortest repr: what the sender wrote
        except InvalidOperation:  # pragma: no cover - repr of a finite float parses
            raise AmountError(f"{name} must be a number") from None
    else:
        if abs(value) > MAX_AMOUNT * 10:  # before Decimal: no 10**100000 digit strings
            raise AmountError(f"{name} must be <= {MAX_AMOUNT}")
        amount = Decimal(value)
    if amount < tick:
        raise AmountError(f"{name} must be at least {tick}")
    if amount > MAX_AMOUNT:
        raise AmountError(f"{name} must be <= {MAX_AMOUNT}")
    if amount % tick != 0:
        raise AmountError(f"{name} must be a multiple of {tick}, got {amount}")
    return amount.quantize(tick)


def to_wire(amount: Decimal) -> str:
    """``Decimal('1.5000')`` -> ``'1.5'``; ``Decimal('100.00')`` -> ``'100'``."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
