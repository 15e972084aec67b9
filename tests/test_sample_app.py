"""The sample app's /trading namespace, through the test client (semantics only)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask_socketio import SocketIO

from sample_app.app import create_app
from sample_app.models import Order, db

NS = "/trading"
GOOD = {"symbol": "BTC.USD", "side": "buy", "qty": 1.5, "price": 100.0}


@pytest.fixture
def trading(database_url: str) -> Iterator[tuple[Flask, SocketIO]]:
    app, socketio = create_app(database_url=database_url, async_mode="threading")
    yield app, socketio
    with app.app_context():
        db.engine.dispose()


def _stored(app: Flask) -> int:
    with app.app_context():
        return db.session.query(Order).count()


def _checked_out(app: Flask) -> int:
    with app.app_context():
        return db.engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


def test_place_list_cancel(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    a = socketio.test_client(app, namespace=NS)
    b = socketio.test_client(app, namespace=NS)
    ack = a.emit("place_order", GOOD, namespace=NS, callback=True)
    assert ack["ok"] is True
    order = ack["order"]
    assert {k: order[k] for k in GOOD} == GOOD
    assert order["status"] == "open" and isinstance(order["id"], int)
    # the other client is told
    received = [m for m in b.get_received(NS) if m["name"] == "order_placed"]
    assert received and received[0]["args"][0]["id"] == order["id"]
    listed = a.emit("list_orders", namespace=NS, callback=True)
    assert [o["id"] for o in listed["orders"]] == [order["id"]]
    assert a.emit("cancel_order", order["id"], namespace=NS, callback=True) == {"ok": True}
    again = a.emit("cancel_order", order["id"], namespace=NS, callback=True)
    assert again["error"] == "invalid_request"
    assert _checked_out(app) == 0


BAD_ORDERS: list[Any] = [
    None,
    "BTC",
    [GOOD],
    {},
    {k: v for k, v in GOOD.items() if k != "qty"},
    {**GOOD, "extra": 1},
    {**GOOD, "symbol": "btc"},
    {**GOOD, "symbol": ""},
    {**GOOD, "symbol": "A" * 13},
    {**GOOD, "symbol": "X" * 100_000},
    {**GOOD, "symbol": 5},
    {**GOOD, "side": "hold"},
    {**GOOD, "qty": 0},
    {**GOOD, "qty": -1},
    {**GOOD, "qty": math.nan},
    {**GOOD, "qty": math.inf},
    {**GOOD, "price": -math.inf},
    {**GOOD, "qty": True},
    {**GOOD, "price": "100"},
    {**GOOD, "price": 1e9 + 1},
]


@pytest.mark.parametrize("payload", BAD_ORDERS)
def test_bad_orders_are_rejected_and_nothing_is_stored(
    trading: tuple[Flask, SocketIO], payload: Any
) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    ack = client.emit("place_order", payload, namespace=NS, callback=True)
    assert ack["error"] == "invalid_request"
    assert ack["retryable"] is False
    assert _stored(app) == 0
    assert _checked_out(app) == 0


def test_healthz(trading: tuple[Flask, SocketIO]) -> None:
    app, _ = trading
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["healthy"] is True
