"""The sample app through the test client: /trading semantics (validation, matching,
broadcasts after commit), /monitor, /metrics, /healthz, the page's assets and the CLI."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import wait_for
from flask import Flask
from flask_socketio import SocketIO
from sqlalchemy.orm import Session

from sample_app.app import create_app
from sample_app.models import Order, Trade, db

NS = "/trading"
STATIC = Path(__file__).resolve().parent.parent / "sample_app" / "static"
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
    assert (order["symbol"], order["side"], order["qty"], order["price"]) == (
        "BTC.USD",
        "buy",
        "1.5",
        "100",
    )
    assert (order["filled_qty"], order["open_qty"]) == ("0", "1.5")
    assert order["status"] == "open" and isinstance(order["id"], int)
    # the other client is told
    received = [m for m in b.get_received(NS) if m["name"] == "order_placed"]
    assert received and received[0]["args"][0]["id"] == order["id"]
    listed = a.emit("list_orders", namespace=NS, callback=True)
    assert [o["id"] for o in listed["orders"]] == [order["id"]]
    cancelled = {**order, "status": "cancelled", "open_qty": "0"}
    ack = a.emit("cancel_order", order["id"], namespace=NS, callback=True)
    assert ack == {"ok": True, "order": cancelled}
    # a second cancel is an answer, not an error: the order is no longer open
    again = a.emit("cancel_order", order["id"], namespace=NS, callback=True)
    assert again == {"ok": False, "order": cancelled}
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
    {**GOOD, "price": 1e9 + 1},
    {**GOOD, "price": "1000000000.01"},
    {**GOOD, "qty": 10**30},
    {**GOOD, "qty": -(10**30)},
    # off the tick (price 0.01, qty 0.0001), below one tick, malformed strings
    {**GOOD, "price": 0.1 + 0.2},  # 0.30000000000000004, what JavaScript sends
    {**GOOD, "price": 100.001},
    {**GOOD, "price": "100.001"},
    {**GOOD, "price": 0.001},
    {**GOOD, "price": "0"},
    {**GOOD, "qty": 0.00001},
    {**GOOD, "qty": 5e-324},
    {**GOOD, "qty": 1e-17},
    {**GOOD, "qty": "1e3"},
    {**GOOD, "qty": "-1"},
    {**GOOD, "qty": "+1"},
    {**GOOD, "qty": " 1"},
    {**GOOD, "qty": "1."},
    {**GOOD, "qty": ".5"},
    {**GOOD, "qty": "NaN"},
    {**GOOD, "qty": "Infinity"},
    {**GOOD, "qty": "1_000"},
    {**GOOD, "qty": "\u0661"},  # ARABIC-INDIC DIGIT ONE: a digit, not ASCII
    {**GOOD, "qty": "1" * 100_000},
    {**GOOD, "qty": None},
    {**GOOD, "qty": [1]},
    {**GOOD, "price": {"value": 1}},
    # client order ids: 8-64 of [A-Za-z0-9_-]
    {**GOOD, "client_order_id": "short"},
    {**GOOD, "client_order_id": "x" * 65},
    {**GOOD, "client_order_id": "has space1"},
    {**GOOD, "client_order_id": 12345678},
    {**GOOD, "client_order_id": None},
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


# -- matching --------------------------------------------------------------------------


def _place(client: Any, symbol: str, side: str, qty: float, price: float) -> dict[str, Any]:
    ack = client.emit(
        "place_order",
        {"symbol": symbol, "side": side, "qty": qty, "price": price},
        namespace=NS,
        callback=True,
    )
    assert ack.get("ok") is True, ack
    order: dict[str, Any] = ack["order"]
    return order


def _received(client: Any, name: str) -> list[Any]:
    return [m["args"][0] for m in client.get_received(NS) if m["name"] == name]


def _orders(app: Flask) -> dict[int, Order]:
    with app.app_context():
        return {o.id: o for o in db.session.scalars(db.select(Order))}


def _trades(app: Flask) -> list[Trade]:
    with app.app_context():
        return list(db.session.scalars(db.select(Trade).order_by(Trade.id)))


def test_price_time_priority(trading: tuple[Flask, SocketIO]) -> None:
    """A buy takes the cheapest sell first and, at one price, the oldest; each trade is
    at the resting order's price; the sell priced above the limit is not touched."""
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    s101 = _place(client, "X", "sell", 1, 101)
    s100_old = _place(client, "X", "sell", 1, 100)
    s100_new = _place(client, "X", "sell", 1, 100)
    s103 = _place(client, "X", "sell", 1, 103)
    _place(client, "Y", "sell", 1, 50)  # another symbol never matches
    buy = _place(client, "X", "buy", 2.5, 102)
    assert buy["status"] == "filled"
    assert (buy["qty"], buy["filled_qty"], buy["open_qty"]) == ("2.5", "2.5", "0")
    trades = _trades(app)
    assert [(t.sell_order_id, t.price, t.qty) for t in trades] == [
        (s100_old["id"], D("100"), D("1")),
        (s100_new["id"], D("100"), D("1")),
        (s101["id"], D("101"), D("0.5")),
    ]
    assert all(t.buy_order_id == buy["id"] and t.taker_side == "buy" for t in trades)
    orders = _orders(app)
    assert orders[s100_old["id"]].status == orders[s100_new["id"]].status == "filled"
    assert orders[s100_old["id"]].open_qty == 0
    assert orders[s101["id"]].status == "open" and orders[s101["id"]].open_qty == D("0.5")
    assert orders[s101["id"]].qty == 1 and orders[s101["id"]].filled_qty == D("0.5")
    assert orders[s103["id"]].status == "open" and orders[s103["id"]].open_qty == 1
    assert _checked_out(app) == 0


def test_sell_takes_highest_buy_at_its_price(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    low = _place(client, "X", "buy", 1, 99)
    high = _place(client, "X", "buy", 1, 100)
    sell = _place(client, "X", "sell", 1.5, 95)
    assert sell["status"] == "filled" and sell["open_qty"] == "0"
    trades = _trades(app)
    assert [(t.buy_order_id, t.price, t.qty) for t in trades] == [
        (high["id"], D("100"), D("1")),
        (low["id"], D("99"), D("0.5")),
    ]
    assert all(t.sell_order_id == sell["id"] and t.taker_side == "sell" for t in trades)
    orders = _orders(app)
    assert orders[low["id"]].status == "open" and orders[low["id"]].open_qty == D("0.5")


def test_partial_fill_of_the_resting_order(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    a = socketio.test_client(app, namespace=NS)
    b = socketio.test_client(app, namespace=NS)
    sell = _place(a, "X", "sell", 5, 100)
    a.get_received(NS)
    b.get_received(NS)
    buy = _place(a, "X", "buy", 2, 100)
    assert buy["status"] == "filled" and buy["open_qty"] == "0"
    orders = _orders(app)
    assert orders[sell["id"]].status == "open" and orders[sell["id"]].open_qty == 3
    # every client hears of the order, the trade and the resting order's new state
    for client in (a, b):
        received = client.get_received(NS)
        names = [m["name"] for m in received]
        assert names == ["order_placed", "trade", "order_updated"], names
        placed, trade, updated = (m["args"][0] for m in received)
        assert placed == buy
        assert trade["qty"] == "2" and trade["price"] == "100"
        assert (trade["buy_order_id"], trade["sell_order_id"]) == (buy["id"], sell["id"])
        assert updated["id"] == sell["id"] and updated["qty"] == "5"
        assert (updated["filled_qty"], updated["open_qty"]) == ("2", "3")
        assert updated["status"] == "open"


def test_orders_that_do_not_cross_rest(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    _place(client, "X", "sell", 1, 100.01)
    buy = _place(client, "X", "buy", 1, 100)
    assert buy["status"] == "open" and buy["open_qty"] == "1"
    assert _trades(app) == []
    # a cancelled order is off the book
    sell = _place(client, "X", "sell", 1, 99)
    assert sell["status"] == "filled"
    again = _place(client, "X", "sell", 1, 99)
    assert again["status"] == "open"
    assert client.emit("cancel_order", again["id"], namespace=NS, callback=True)["ok"] is True
    late_buy = _place(client, "X", "buy", 1, 99.5)
    assert late_buy["status"] == "open"
    assert len(_trades(app)) == 1


def test_broadcasts_only_after_commit(
    trading: tuple[Flask, SocketIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``order_placed`` is emitted when the order is visible to other connections."""
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    seen: list[tuple[str, bool]] = []
    emit = socketio.emit

    def spy(event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "order_placed":
            with app.app_context(), db.engine.connect() as conn:
                found = conn.execute(sa.select(Order.id).where(Order.id == args[0]["id"])).first()
            seen.append((event, found is not None))
        return emit(event, *args, **kwargs)

    monkeypatch.setattr(socketio, "emit", spy)
    _place(client, "X", "sell", 1, 100)
    _place(client, "X", "buy", 1, 100)
    assert seen == [("order_placed", True), ("order_placed", True)]


def test_failed_commit_broadcasts_nothing(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    a = socketio.test_client(app, namespace=NS)
    b = socketio.test_client(app, namespace=NS)

    def fail(session: Any) -> None:
        raise RuntimeError("commit refused by the test")

    sa.event.listen(Session, "before_commit", fail)
    try:
        ack = a.emit("place_order", GOOD, namespace=NS, callback=True)
    finally:
        sa.event.remove(Session, "before_commit", fail)
    assert ack["error"] == "internal_error"
    assert b.get_received(NS) == [] and a.get_received(NS) == []
    assert _stored(app) == 0
    assert _checked_out(app) == 0
    # the book lock was released with the rolled-back transaction
    assert _place(a, GOOD["symbol"], "buy", 1, 100)["status"] == "open"


# -- list_orders, list_trades, cancel_order ------------------------------------------


def test_list_orders_newest_first_with_symbol_and_limit(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    ids = [_place(client, "A" if i % 2 else "B", "buy", 1, 10 + i)["id"] for i in range(6)]
    listed = client.emit("list_orders", namespace=NS, callback=True)["orders"]
    assert [o["id"] for o in listed] == ids[::-1]
    only_a = client.emit("list_orders", {"symbol": "A"}, namespace=NS, callback=True)
    assert [o["id"] for o in only_a["orders"]] == [ids[5], ids[3], ids[1]]
    two = client.emit("list_orders", {"limit": 2}, namespace=NS, callback=True)
    assert [o["id"] for o in two["orders"]] == [ids[5], ids[4]]
    both = client.emit("list_orders", {"symbol": "B", "limit": 1}, namespace=NS, callback=True)
    assert [o["id"] for o in both["orders"]] == [ids[4]]
    assert client.emit("list_orders", {}, namespace=NS, callback=True)["orders"] == listed
    assert client.emit("list_orders", None, namespace=NS, callback=True)["orders"] == listed


def test_list_trades(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    _place(client, "X", "sell", 3, 100)
    _place(client, "X", "buy", 1, 100)
    _place(client, "X", "buy", 1, 100)
    trades = client.emit("list_trades", namespace=NS, callback=True)["trades"]
    assert len(trades) == 2 and trades[0]["id"] > trades[1]["id"]
    one = client.emit("list_trades", {"symbol": "X", "limit": 1}, namespace=NS, callback=True)
    assert [t["id"] for t in one["trades"]] == [trades[0]["id"]]
    bad = client.emit("list_trades", {"limit": 0}, namespace=NS, callback=True)
    assert bad["error"] == "invalid_request"


BAD_LISTS: list[Any] = [
    "BTC",
    5,
    [],
    {"extra": 1},
    {"limit": 0},
    {"limit": 501},
    {"limit": -1},
    {"limit": True},
    {"limit": 1.5},
    {"limit": "10"},
    {"limit": None},
    {"symbol": "btc"},
    {"symbol": ""},
    {"symbol": 5},
    {"symbol": "A" * 13},
    {"symbol": "X" * 100_000},
]


@pytest.mark.parametrize("payload", BAD_LISTS)
def test_bad_list_requests_are_rejected(trading: tuple[Flask, SocketIO], payload: Any) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    _place(client, "X", "buy", 1, 100)
    ack = client.emit("list_orders", payload, namespace=NS, callback=True)
    assert ack["error"] == "invalid_request" and ack["retryable"] is False
    assert "orders" not in ack
    assert _stored(app) == 1
    assert _checked_out(app) == 0


def test_list_orders_with_two_arguments_is_rejected(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    ack = client.emit("list_orders", {}, {}, namespace=NS, callback=True)
    assert ack["error"] == "invalid_request"
    assert _checked_out(app) == 0


BAD_ORDER_IDS: list[Any] = [
    None,
    "1",
    0,
    -1,
    True,
    1.0,
    1.5,
    math.nan,
    [1],
    {"id": 1},
    2**63,
    10**30,
    999_999,  # well formed, but no such order
]


def _statuses(app: Flask) -> dict[int, tuple[str, float]]:
    return {i: (o.status, o.open_qty) for i, o in _orders(app).items()}


@pytest.mark.parametrize("order_id", BAD_ORDER_IDS)
def test_bad_cancel_requests_are_rejected_and_change_nothing(
    trading: tuple[Flask, SocketIO], order_id: Any
) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    _place(client, "X", "buy", 1, 100)
    before = _statuses(app)
    client.get_received(NS)
    ack = client.emit("cancel_order", order_id, namespace=NS, callback=True)
    assert ack["error"] == "invalid_request" and ack["retryable"] is False
    assert _statuses(app) == before
    assert client.get_received(NS) == []
    assert _checked_out(app) == 0


@pytest.mark.parametrize("args", [(), (1, 2)], ids=["no-argument", "two-arguments"])
def test_cancel_order_with_wrong_arity_is_rejected(
    trading: tuple[Flask, SocketIO], args: tuple[Any, ...]
) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    order = _place(client, "X", "buy", 1, 100)
    ack = client.emit("cancel_order", *args, namespace=NS, callback=True)
    assert ack["error"] == "invalid_request"
    assert _statuses(app) == {order["id"]: ("open", 1)}
    assert _checked_out(app) == 0


def test_cancel_of_an_order_no_longer_open_is_an_answer(
    trading: tuple[Flask, SocketIO],
) -> None:
    """A known order that filled (or was cancelled) first: ``{"ok": false, "order"}``
    with its final state, nothing changed and nothing broadcast; not an error."""
    app, socketio = trading
    a = socketio.test_client(app, namespace=NS)
    b = socketio.test_client(app, namespace=NS)
    sell = _place(a, "X", "sell", 1, 100)
    buy = _place(a, "X", "buy", 1, 100)
    b.get_received(NS)
    for order_id in (sell["id"], buy["id"]):
        ack = a.emit("cancel_order", order_id, namespace=NS, callback=True)
        assert ack["ok"] is False and "error" not in ack
        assert ack["order"]["id"] == order_id
        assert (ack["order"]["status"], ack["order"]["filled_qty"]) == ("filled", "1")
        assert ack["order"]["open_qty"] == "0"
    assert b.get_received(NS) == []
    resting = _place(a, "X", "sell", 2, 105)
    b.get_received(NS)
    cancelled = {**resting, "status": "cancelled", "open_qty": "0"}
    ack = a.emit("cancel_order", resting["id"], namespace=NS, callback=True)
    assert ack == {"ok": True, "order": cancelled}
    assert _received(b, "order_updated") == [cancelled]
    ack = a.emit("cancel_order", resting["id"], namespace=NS, callback=True)
    assert ack == {"ok": False, "order": cancelled}
    assert _received(b, "order_updated") == []
    assert _statuses(app)[resting["id"]] == ("cancelled", 0)
    assert _checked_out(app) == 0


# -- exact money -----------------------------------------------------------------------


def test_many_partial_fills_sum_exactly(trading: tuple[Flask, SocketIO]) -> None:
    """A resting order filled by 120 random partial trades: every sum is exact."""
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    rng = random.Random(15)
    pieces = [D(rng.randint(1, 5000)) * D("0.0001") for _ in range(120)]
    total = sum(pieces, D(0))
    resting = _place(client, "EX", "sell", str(total), "10.01")
    for i, piece in enumerate(pieces):
        # as a JSON number half the time: its shortest repr is the decimal written
        qty: Any = str(piece) if i % 2 else float(piece)
        taker = _place(client, "EX", "buy", qty, "10.01")
        assert taker["status"] == "filled" and taker["filled_qty"] == str(piece.normalize())
    orders = _orders(app)
    final = orders[resting["id"]]
    assert final.status == "filled"
    assert (final.qty, final.filled_qty, final.open_qty) == (total, total, 0)
    trades = _trades(app)
    assert len(trades) == 120
    assert [t.qty for t in trades] == pieces
    assert sum((t.qty for t in trades), D(0)) == total
    assert all(t.price == D("10.01") for t in trades)
    assert _checked_out(app) == 0


def test_javascript_sums_are_refused_and_decimals_fill_exactly(
    trading: tuple[Flask, SocketIO],
) -> None:
    """``0.1 + 0.2`` as JavaScript sends it is off the tick and refused; 0.1 and 0.2
    fill a 0.3 order to exactly 0.3, leaving exactly 0."""
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    bad = {"symbol": "EX", "side": "buy", "qty": 0.1 + 0.2, "price": 1}
    ack = client.emit("place_order", bad, namespace=NS, callback=True)
    assert ack["error"] == "invalid_request" and "0.0001" in ack["message"]
    assert _stored(app) == 0
    resting = _place(client, "EX", "buy", 0.3, 1)
    assert resting["qty"] == "0.3"
    first = _place(client, "EX", "sell", 0.1, 1)
    second = _place(client, "EX", "sell", "0.2", "1.00")
    assert first["status"] == second["status"] == "filled"
    final = _orders(app)[resting["id"]]
    assert (final.status, final.filled_qty, final.open_qty) == ("filled", D("0.3"), 0)
    assert [t.qty for t in _trades(app)] == [D("0.1"), D("0.2")]


def test_amounts_at_the_limits(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace=NS)
    smallest = _place(client, "EX", "buy", "0.0001", "0.01")
    assert (smallest["qty"], smallest["price"]) == ("0.0001", "0.01")
    largest = _place(client, "EX2", "sell", 1_000_000_000, "1000000000.00")
    assert (largest["qty"], largest["price"]) == ("1000000000", "1000000000")
    stored = _orders(app)
    assert stored[largest["id"]].qty == D(10) ** 9 and stored[smallest["id"]].price == D("0.01")


# -- monitor, metrics, page ------------------------------------------------------------


def test_monitor_needs_the_token(database_url: str) -> None:
    app, socketio = create_app(database_url=database_url, monitor_auth="s3cret")
    try:
        refused = socketio.test_client(app, namespace="/monitor", auth={"token": "nope"})
        assert not refused.is_connected("/monitor")
        monitor = socketio.test_client(app, namespace="/monitor", auth={"token": "s3cret"})
        assert monitor.is_connected("/monitor")
        pushed = [m for m in monitor.get_received("/monitor") if m["name"] == "pool_status"]
        assert pushed and pushed[0]["args"][0]["pools"]["default"]["checked_out"] == 0
        trader = socketio.test_client(app, namespace=NS)
        _place(trader, "X", "buy", 1, 100)
        status = monitor.emit("get_status", namespace="/monitor", callback=True)
        assert status["events"]["/trading:place_order"]["count"] == 1
        monitor.disconnect(namespace="/monitor")
    finally:
        with app.app_context():
            db.engine.dispose()


def test_no_monitor_without_a_token(trading: tuple[Flask, SocketIO]) -> None:
    app, socketio = trading
    client = socketio.test_client(app, namespace="/monitor", auth={"token": ""})
    assert not client.is_connected("/monitor")


def test_metrics(trading: tuple[Flask, SocketIO]) -> None:
    pytest.importorskip("prometheus_client")
    app, socketio = trading
    _place(socketio.test_client(app, namespace=NS), "X", "buy", 1, 100)
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert 'db_client_connection_count{pool_name="default",state="used"} 0.0' in text
    assert 'socketio_dbctx_events_total{event="place_order"' in text


def test_healthz_503_when_the_database_is_gone(tmp_path: Path) -> None:
    app, _ = create_app(database_url=f"sqlite:///{tmp_path}/gone.db")
    (tmp_path / "gone.db").unlink()
    (tmp_path / "gone.db").mkdir()  # a directory where the database file was
    try:
        with app.app_context():
            db.engine.dispose()
        response = app.test_client().get("/healthz")
        assert response.status_code == 503
        body = response.get_json()
        assert body["healthy"] is False and body["error"]
    finally:
        with app.app_context():
            db.engine.dispose()


URL = re.compile(rb"(?:https?|wss?)://[^\s\"'`)<>]*")
#: URLs inside the vendored libraries that the browser never fetches: an error
#: message's documentation link, the scheme prefix socket.io puts before a bare
#: host name (the page's own), and uPlot's banner comment.
VENDOR_URLS = {
    b"https://socket.io/docs/v3/migrating-from-2-x-to-3-0/",
    b"https://",
    b"https://github.com/leeoniya/uPlot",
}


def test_the_page_loads_only_its_own_assets(trading: tuple[Flask, SocketIO]) -> None:
    app, _ = trading
    http = app.test_client()
    page = http.get("/?token=x")
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.headers["Referrer-Policy"] == "no-referrer"
    html = page.get_data()
    assert URL.findall(html) == []
    assets = re.findall(rb'(?:src|href)="([^"]+)"', html)
    assert len(assets) == 6
    for asset in assets:
        assert asset.startswith(b"/static/"), asset
        response = http.get(asset.decode())
        assert response.status_code == 200, asset
        body = response.get_data()
        response.close()
        found = set(URL.findall(body))
        if b"/vendor/" in asset:
            assert found <= VENDOR_URLS, (asset, found)
        else:
            assert found == set(), (asset, found)
    # and every file that could be served
    for path in STATIC.rglob("*"):
        if path.is_file() and path.suffix in {".js", ".css", ".html", ".svg"}:
            allowed = VENDOR_URLS if "vendor" in path.parts else set()
            assert set(URL.findall(path.read_bytes())) <= allowed, path
    for path in (STATIC.parent / "templates").rglob("*.html"):
        assert URL.findall(path.read_bytes()) == [], path


def test_vendored_libraries_keep_their_licences() -> None:
    vendor = STATIC / "vendor"
    for name in ("socket.io-client/LICENSE", "socket.io-client/LICENSE.bundled", "uplot/LICENSE"):
        assert "MIT License" in (vendor / name).read_text(), name
    for name in ("socket.io-client/socket.io.min.js", "uplot/uPlot.iife.min.js"):
        assert (vendor / name).stat().st_size > 10_000, name


# -- command line ----------------------------------------------------------------------


def test_command_line_and_environment() -> None:
    from sample_app.__main__ import dashboard_url, monitor_token, parse_args

    args = parse_args(
        [],
        {"DATABASE_URL": "sqlite:///x.db", "SOCKETIO_MESSAGE_QUEUE": "redis://127.0.0.1:6379/0"},
    )
    assert (args.host, args.port) == ("127.0.0.1", 5000)
    assert args.database_url == "sqlite:///x.db"
    assert args.message_queue == "redis://127.0.0.1:6379/0"
    args = parse_args(
        ["--host", "0.0.0.0", "--port", "8080", "--async-mode", "threading",
         "--database-url", "sqlite:///y.db", "--message-queue", "redis://h/1"],
        {"DATABASE_URL": "sqlite:///x.db"},
    )  # fmt: skip
    assert (args.host, args.port, args.async_mode) == ("0.0.0.0", 8080, "threading")
    assert (args.database_url, args.message_queue) == ("sqlite:///y.db", "redis://h/1")
    assert parse_args([], {}).database_url is None
    with pytest.raises(SystemExit):
        parse_args(["--async-mode", "asyncio"], {})
    with pytest.raises(SystemExit):
        parse_args(["--port", "70000"], {})

    token, generated = monitor_token({})
    assert generated and len(token) >= 32
    assert monitor_token({})[0] != token
    assert not any(monitor_token({})[0].startswith("-") for _ in range(300))
    assert monitor_token({"DBCTX_MONITOR_AUTH": "mine"}) == ("mine", False)
    assert monitor_token({"DBCTX_MONITOR_AUTH": ""})[1] is True
    assert dashboard_url("127.0.0.1", 5000, "a-b_c") == "http://127.0.0.1:5000/?token=a-b_c"
    assert dashboard_url("0.0.0.0", 80, "t") == "http://127.0.0.1:80/?token=t"
    assert dashboard_url("::1", 80, "t") == "http://[::1]:80/?token=t"
    assert "<DBCTX_MONITOR_AUTH>" in dashboard_url("localhost", 1, None)


def test_default_database_is_sqlite_in_the_instance_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import flask

    monkeypatch.setattr(
        flask.Flask, "auto_find_instance_path", lambda self: str(tmp_path / "instance")
    )
    app, _ = create_app()
    try:
        expected = "sqlite:///" + str(tmp_path / "instance" / "trading.db")
        assert app.config["SQLALCHEMY_DATABASE_URI"] == expected
        assert (tmp_path / "instance" / "trading.db").is_file()
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # its advisory lock
def test_a_book_locked_too_long_answers_busy(
    trading: tuple[Flask, SocketIO], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """PostgreSQL: another transaction holds the book's advisory lock past the lock
    timeout: the order is acked ``busy`` with a retry hint, and nothing is stored."""
    from sample_app import book

    app, socketio = trading
    with app.app_context():
        holder = db.engine.connect()
    monkeypatch.setattr(book, "LOCK_TIMEOUT", 0.2)
    client = socketio.test_client(app, namespace=NS)
    try:
        with holder.begin():
            holder.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('LOCKED'))"))
            ack = client.emit(
                "place_order", {**GOOD, "symbol": "LOCKED"}, namespace=NS, callback=True
            )
    finally:
        holder.close()
    assert ack["error"] == "busy" and ack["retryable"] is True, ack
    assert ack["retry_after_ms"] == 500
    assert _stored(app) == 0
    assert _place(client, "LOCKED", "buy", 1, 1)["status"] == "open"
    assert _checked_out(app) == 0


def test_a_repeated_client_order_id_is_placed_once(trading: tuple[Flask, SocketIO]) -> None:
    """``place_order`` is ``@idempotency_key(client_order_id)``: the page resends an order
    with its id after no answer, ``busy`` or ``outcome_unknown``; the repeat gets the first
    ack, from any client, and nothing is stored twice."""

    app, socketio = trading
    a = socketio.test_client(app, namespace=NS)
    b = socketio.test_client(app, namespace=NS)
    order = {**GOOD, "client_order_id": "page-0123456789abcdef"}
    first = a.emit("place_order", order, namespace=NS, callback=True)
    assert first["ok"] is True
    assert a.emit("place_order", order, namespace=NS, callback=True) == first
    assert b.emit("place_order", order, namespace=NS, callback=True) == first
    assert _stored(app) == 1
    other = b.emit(
        "place_order", {**order, "client_order_id": "page-fedcba9876543210"}, namespace=NS,
        callback=True,
    )  # fmt: skip
    assert other["ok"] is True and other["order"]["id"] != first["order"]["id"]
    assert _stored(app) == 2
    # the first key claimed started a background purge of expired keys, which holds a
    # connection for a moment: poll (about 1 run in 10 looked while it did)
    wait_for(lambda: _checked_out(app) == 0, 10, "every connection back in the pool")
