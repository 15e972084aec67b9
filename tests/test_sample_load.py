"""The load driver (``python -m sample_app.load``) against the real sample app.

The app runs as ``python -m sample_app`` in a subprocess in each async mode, on
SQLite and on PostgreSQL; the driver runs as a subprocess too and must stop by
itself. After the load: no connection is left checked out, and the book is
consistent (no order over-filled, no crossed book), which only holds when
concurrent orders are matched one at a time per symbol.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import REPO_ROOT, wait_for
from monitor_client import MonitorClient

from sample_app import load, validation
from sample_app.process import SampleAppProcess, StartError

pytestmark = pytest.mark.server

TOKEN = "load-test-token"
DURATION = 3.0


# -- the driver's arguments and orders (no server) ---------------------------------------


def test_orders_are_valid_and_some_cross() -> None:
    rng = random.Random(7)
    orders = [load.make_order(rng, "BTC.USD") for _ in range(2000)]
    for order in orders:
        checked = validation.order_request(order)
        assert checked == {**order, "qty": Decimal(order["qty"]), "price": Decimal(order["price"])}
    best_buy = max(Decimal(o["price"]) for o in orders if o["side"] == "buy")
    best_sell = min(Decimal(o["price"]) for o in orders if o["side"] == "sell")
    assert best_buy > best_sell  # the generated flow crosses
    for order in load.INVALID_ORDERS:
        with pytest.raises(validation.InvalidRequestError):
            validation.order_request(order)


@pytest.mark.parametrize(
    "argv",
    [
        ["--url", "http://example.com:5000"],
        ["--url", "http://10.0.0.1:5000"],
        ["--url", "ftp://127.0.0.1"],
        ["--url", "127.0.0.1:5000"],
        ["--clients", "0"],
        ["--clients", "1001"],
        ["--rate", "0"],
        ["--rate", "nan"],
        ["--rate", "1e6"],
        ["--duration", "-1"],
        ["--duration", "inf"],
        ["--duration", "3601"],
        ["--list-ratio", "0.6", "--cancel-ratio", "0.6"],
        ["--symbols", ","],
    ],
)
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load.parse_args(argv)
    assert info.value.code == 2
    capsys.readouterr()


def test_local_urls_are_accepted() -> None:
    for url in ("http://127.0.0.1:5000", "http://localhost:1", "http://[::1]:5000"):
        assert load.parse_args(["--url", url]).url == url
    remote = load.parse_args(["--url", "http://example.com", "--allow-remote"])
    assert remote.url == "http://example.com"


# -- against the running app -------------------------------------------------------------


@pytest.fixture(params=["threading", "eventlet", "gevent"])
def async_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sample_app(async_mode: str, database_url: str, tmp_path: Path) -> Iterator[SampleAppProcess]:
    # threading with a token from the environment; the others let the app generate one
    token = TOKEN if async_mode == "threading" else None
    server = SampleAppProcess(
        database_url, token=token, async_mode=async_mode, log_path=tmp_path / "app.log"
    )
    try:
        server.start()
    except StartError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


def _run_load(server: SampleAppProcess, *extra: str, timeout: float = 60) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "sample_app.load",
        "--url",
        server.url,
        "--clients",
        "4",
        "--rate",
        "25",
        "--duration",
        str(DURATION),
        "--seed",
        "11",
        "--symbols",
        "BTC.USD",
        "--json",
        *extra,
    ]
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    wall = time.monotonic() - started
    assert result.returncode == 0, (
        f"load driver exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        f"\n--- app log ---\n{server.log()[-4000:]}"
    )
    summary: dict[str, Any] = json.loads(result.stdout)
    summary["wall_s"] = wall
    return summary


def _assert_consistent_book(database_url: str) -> None:
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            bad = conn.execute(
                sa.text(
                    "SELECT count(*) FROM orders WHERE qty <= 0 OR filled_qty < 0 "
                    "OR filled_qty > qty OR (status = 'filled' AND filled_qty <> qty) "
                    "OR (status = 'open' AND filled_qty >= qty)"
                )
            ).scalar()
            assert bad == 0
            best_buy = conn.execute(
                sa.text("SELECT max(price) FROM orders WHERE status = 'open' AND side = 'buy'")
            ).scalar()
            best_sell = conn.execute(
                sa.text("SELECT min(price) FROM orders WHERE status = 'open' AND side = 'sell'")
            ).scalar()
            assert best_buy is None or best_sell is None or best_buy < best_sell, (
                f"crossed book: open buy at {best_buy} >= open sell at {best_sell}"
            )
            # every trade is at a price both of its orders accepted
            wrong = conn.execute(
                sa.text(
                    "SELECT count(*) FROM trades t JOIN orders b ON b.id = t.buy_order_id "
                    "JOIN orders s ON s.id = t.sell_order_id "
                    "WHERE t.price > b.price OR t.price < s.price OR t.qty <= 0 "
                    "OR b.side <> 'buy' OR s.side <> 'sell'"
                )
            ).scalar()
            assert wrong == 0
    finally:
        engine.dispose()


def test_load_driver_trades_and_stops_by_itself(
    sample_app: SampleAppProcess, database_url: str
) -> None:
    if sample_app.async_mode != "threading":
        assert sample_app.token and sample_app.token != TOKEN  # generated, read from the log
        assert f"{sample_app.url}/?token={sample_app.token}" in sample_app.log()
    summary = _run_load(sample_app, f"--token={sample_app.token}")  # it may start with "-"
    assert summary["connected"] == 4
    assert summary["events"] > 50
    assert summary["acks_ok"] > 0.8 * summary["events"]
    # cancels of orders filled in the meantime are answers (late), not errors
    assert summary["errors"] == {}, summary["errors"]
    assert summary["by_event"]["place_order"]["errors"] == {}
    assert summary["broadcasts_seen_by_client_0"].get("trade", 0) > 0
    assert summary["p50_ms"] is not None and summary["p99_ms"] is not None
    assert DURATION <= summary["elapsed_s"] < DURATION + 10
    assert summary["wall_s"] < DURATION + 30
    server = summary["server"]
    assert server["leaks"] == 0, server
    assert (
        server["events"]["/trading:place_order"]["count"]
        >= (summary["by_event"]["place_order"]["sent"])
    )

    def pool_idle() -> bool:  # every event was acked, so this should be true at once
        status = _monitor_status(sample_app)
        return bool(status["pools"]["default"]["checked_out"] == 0)

    wait_for(pool_idle, 10, f"connections still checked out after the load: {server}")
    _assert_consistent_book(database_url)
    assert sample_app.alive()


def test_invalid_orders_are_counted_by_code(tmp_path: Path) -> None:
    with SampleAppProcess(
        f"sqlite:///{tmp_path}/invalid.db", token=TOKEN, log_path=tmp_path / "app.log"
    ) as server:
        summary = _run_load(server, "--invalid-ratio", "0.5", "--cancel-ratio", "0")
    place = summary["by_event"]["place_order"]
    assert place["errors"].get("invalid_request", 0) > 0
    assert place["ok"] > 0
    assert "server" not in summary  # no --token, no server status


def _monitor_status(server: SampleAppProcess) -> dict[str, Any]:
    monitor = MonitorClient(server.url, server.log).connect(server.url, {"token": server.token})
    try:
        status: dict[str, Any] = monitor.call("get_status", timeout=10)
    finally:
        monitor.client.disconnect()
    return status
