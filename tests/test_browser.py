"""The dashboard page in a real browser: headless Chromium driven by Playwright.

The sample app runs as ``python -m sample_app`` (threading mode, SQLite in a temporary
folder, a known ``DBCTX_MONITOR_AUTH``). Chromium is the system's (``/usr/bin/chromium``,
or ``DBCTX_CHROMIUM``); Playwright never downloads a browser. Without either the tests
are skipped with the reason, unless ``DBCTX_REQUIRE_SERVICES=1``, where they fail.

Every page is watched: a console error, an uncaught exception, or a request to
anything but the app itself fails the test.

``DBCTX_UPDATE_SCREENSHOT=1`` also writes the README's ``docs/dashboard.png``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest
import sqlalchemy as sa
from conftest import REPO_ROOT, REQUIRE_SERVICES, schema_url, wait_for

from sample_app.process import SampleAppProcess, StartError

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request

pytestmark = pytest.mark.server

CHROMIUM = os.environ.get("DBCTX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
TOKEN = "browser-test-token"
VIEWPORT = {"width": 1440, "height": 1000}
ARTIFACTS = REPO_ROOT / "test-artifacts"
TIMEOUT_MS = 15_000


def _browser_problem() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set DBCTX_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    problem = _browser_problem()
    if problem is not None:
        if REQUIRE_SERVICES:
            pytest.fail(problem + " (DBCTX_REQUIRE_SERVICES=1: the browser is required)")
        pytest.skip(problem)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _start(
    database_url: str,
    log_path: Path,
    port: int | None = None,
    async_mode: str = "threading",
    env: dict[str, str] | None = None,
) -> SampleAppProcess:
    server = SampleAppProcess(
        database_url,
        token=TOKEN,
        async_mode=async_mode,
        port=port,
        log_path=log_path,
        extra_env=env,
    )
    try:
        return server.start()
    except StartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SampleAppProcess]:
    folder = tmp_path_factory.mktemp("browser")
    app = _start(f"sqlite:///{folder}/trading.db", folder / "app.log")
    yield app
    app.stop()


class Watch:
    """What a page did wrong: console errors, uncaught exceptions, foreign requests."""

    def __init__(self, page: Page, origin: str) -> None:
        self.origin = origin
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.foreign: list[str] = []
        #: console errors matching one of these are expected (a server restart)
        self.tolerated: list[re.Pattern[str]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("request", self._request)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} at {message.location}")

    def _request(self, request: Request) -> None:
        url = request.url
        own = url == self.origin or url.startswith(self.origin + "/")
        if not own and not url.startswith(("data:", "blob:")):
            self.foreign.append(url)

    def problems(self) -> list[str]:
        errors = [e for e in self.console_errors if not any(p.search(e) for p in self.tolerated)]
        return (
            [f"console error: {e}" for e in errors]
            + [f"page error: {e}" for e in self.page_errors]
            + [f"request to another origin: {u}" for u in self.foreign]
        )


OpenPage = Callable[..., "tuple[Page, Watch]"]


@pytest.fixture
def open_page(browser: Browser, server: SampleAppProcess) -> Iterator[OpenPage]:
    """``open_page(path=None, app=None)``: a new browser context on the dashboard."""
    contexts: list[Any] = []
    watches: list[Watch] = []

    def open_(path: str | None = None, app: SampleAppProcess | None = None) -> tuple[Page, Watch]:
        app = app or server
        context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        watch = Watch(page, app.url)
        watches.append(watch)
        page.goto(app.url + (path if path is not None else f"/?token={TOKEN}"))
        return page, watch

    yield open_
    for context in contexts:
        context.close()
    problems = [p for watch in watches for p in watch.problems()]
    assert not problems, "\n".join(problems)


def _connected(page: Page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#trading-state")).to_have_attribute("data-state", "connected")
    expect(page.locator("#trading-state")).to_have_text("trading: connected")


def _place(page: Page, symbol: str, side: str, qty: str, price: str) -> int:
    """Place an order through the form; return its id from the page's status line."""
    from playwright.sync_api import expect

    page.fill("#order-symbol", symbol)
    page.select_option("#order-side", side)
    page.fill("#order-qty", qty)
    page.fill("#order-price", price)
    result = page.locator("#order-result")
    previous = result.text_content() or ""
    page.click("#order-submit")
    expect(result).not_to_have_text(previous)
    expect(result).to_have_attribute("data-ok", "true")
    found = re.match(r"Order #(\d+)", result.text_content() or "")
    assert found, result.text_content()
    return int(found.group(1))


def _order_row(page: Page, order_id: int) -> Any:
    return page.locator(f'#orders tr[data-order-id="{order_id}"]')


def test_the_page_connects_to_trading_and_monitor(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    page, _ = open_page()
    _connected(page)
    expect(page.locator("#monitor-state")).to_have_attribute("data-state", "connected")
    expect(page.locator("#monitor-status")).to_have_attribute("data-status", "healthy")
    expect(page.locator("#workers tbody tr")).to_have_count(1)
    expect(page.locator("#stat-checked-out")).to_have_text(re.compile(r"^\d+ / \d+$"))
    assert page.locator("#chart canvas").count() == 1  # uPlot drew its chart
    assert page.locator("#monitor-message").is_hidden()


def test_an_order_placed_on_one_page_appears_on_another(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    a, _ = open_page()
    b, _ = open_page()
    _connected(a)
    _connected(b)
    order_id = _place(a, "BRW.A", "buy", "3", "42.5")
    for page in (a, b):
        row = _order_row(page, order_id)
        expect(row).to_be_visible()
        expect(row.locator(".symbol")).to_have_text("BRW.A")
        expect(row.locator(".side")).to_have_text("buy")
        expect(row.locator(".qty")).to_have_text("3")
        expect(row.locator(".price")).to_have_text("42.5")
        expect(row).to_have_attribute("data-status", "open")


def test_crossing_orders_make_a_trade_on_both_pages(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    a, _ = open_page()
    b, _ = open_page()
    _connected(a)
    _connected(b)
    sell_id = _place(a, "BRW.T", "sell", "2", "50")
    expect(_order_row(b, sell_id)).to_be_visible()
    buy_id = _place(b, "BRW.T", "buy", "5", "51")
    for page in (a, b):
        trade = page.locator(f'#trades tr[data-sell-order-id="{sell_id}"]')
        expect(trade).to_have_count(1)
        expect(trade).to_have_attribute("data-buy-order-id", str(buy_id))
        expect(trade.locator(".price")).to_have_text("50")  # the resting order's price
        expect(trade.locator(".qty")).to_have_text("2")
        expect(_order_row(page, sell_id)).to_have_attribute("data-status", "filled")
        buy = _order_row(page, buy_id)
        expect(buy).to_have_attribute("data-status", "open")
        expect(buy.locator(".qty")).to_have_text("5")  # as placed
        expect(buy.locator(".filled")).to_have_text("2")
        expect(buy.locator(".open-qty")).to_have_text("3")  # 5 - 2 still open
        sell = _order_row(page, sell_id)
        expect(sell.locator(".qty")).to_have_text("2")  # filled: the original stays
        expect(sell.locator(".open-qty")).to_have_text("0")


def test_cancel_from_the_page(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    a, _ = open_page()
    b, _ = open_page()
    _connected(a)
    _connected(b)
    order_id = _place(a, "BRW.C", "sell", "1", "99")
    expect(_order_row(b, order_id)).to_have_attribute("data-status", "open")
    _order_row(a, order_id).get_by_role("button", name="Cancel").click()
    expect(a.locator("#order-result")).to_have_text(f"Order #{order_id} cancelled")
    for page in (a, b):
        expect(_order_row(page, order_id)).to_have_attribute("data-status", "cancelled")
        expect(_order_row(page, order_id).get_by_role("button")).to_have_count(0)


def test_a_rejected_order_shows_the_reason(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    page, _ = open_page()
    _connected(page)
    page.fill("#order-symbol", "BAD SYMBOL")  # the server validates, whatever the form says
    page.evaluate("document.getElementById('order-symbol').removeAttribute('pattern')")
    page.click("#order-submit")
    result = page.locator("#order-result")
    expect(result).to_have_attribute("data-ok", "false")
    expect(result).to_contain_text("[invalid_request]")


def _cell(page: Page, field: str) -> str:
    cell = page.locator(f'#latency tr[data-event="/trading:place_order"] td[data-field="{field}"]')
    return (cell.text_content() or "") if cell.count() else ""


def _number(text: str) -> float:
    cleaned = text.replace(",", "").strip()
    return float(cleaned) if re.fullmatch(r"\d+(\.\d+)?", cleaned) else -1.0


def test_the_monitor_moves_under_load(open_page: OpenPage, server: SampleAppProcess) -> None:
    from playwright.sync_api import expect

    page, _ = open_page()
    _connected(page)
    expect(page.locator("#monitor-state")).to_have_attribute("data-state", "connected")
    expect(page.locator("#stat-events")).not_to_have_text("\u2013")  # the placeholder
    events_before = _number(page.locator("#stat-events").text_content() or "")
    count_before = max(0.0, _number(_cell(page, "count")))
    points_before = page.evaluate("document.querySelectorAll('#chart canvas').length")
    assert points_before == 1

    load = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sample_app.load",
            "--url",
            server.url,
            "--clients",
            "4",
            "--rate",
            "20",
            "--duration",
            "8",
            "--symbols",
            "LOAD.A,LOAD.B",
            "--seed",
            "5",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # while the load runs: the rate shows, and the event count and latency move
        wait_for(
            lambda: _number(page.locator("#stat-rate").text_content() or "") > 5,
            15,
            "events/s never showed the load",
            interval=0.2,
        )
        wait_for(
            lambda: _number(_cell(page, "count")) >= count_before + 50,
            15,
            "the place_order count did not move",
            interval=0.2,
        )
        assert _number(_cell(page, "p50_ms")) >= 0
        assert _number(_cell(page, "p99_ms")) >= _number(_cell(page, "p50_ms"))
        assert _number(page.locator("#stat-events").text_content() or "") > events_before
        expect(page.locator("#trades tbody tr").first).to_be_visible()
        time.sleep(2)  # a little more history in the chart for the screenshot
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        if os.environ.get("DBCTX_UPDATE_SCREENSHOT") == "1":
            page.screenshot(path=str(REPO_ROOT / "docs" / "dashboard.png"), full_page=True)
    finally:
        output, _ = load.communicate(timeout=60)
    assert load.returncode == 0, output
    # after the load the count keeps what it reached and nothing is left checked out
    expect(page.locator("#stat-checked-out")).to_have_text(re.compile(r"^0 / \d+$"))
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


#: Problems with the page's layout, as a list of strings (empty: fine).
LAYOUT_JS = """() => {
  const problems = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > window.innerWidth + 1)
    problems.push(`the page scrolls sideways: ${doc.scrollWidth} > ${window.innerWidth}`);
  const box = (el) => el.getBoundingClientRect();
  const overlap = (a, b) => a.left < b.right - 1 && b.left < a.right - 1 &&
    a.top < b.bottom - 1 && b.top < a.bottom - 1;
  const inside = (a, b) => a.left >= b.left - 1 && a.right <= b.right + 1 &&
    a.top >= b.top - 1 && a.bottom <= b.bottom + 1;
  const clipped = (el) => el.scrollWidth > el.clientWidth + 1;
  // the order form: fields and button side by side or stacked, never on each other
  const form = document.getElementById("order-form");
  const parts = [...form.querySelectorAll("label, button")];
  parts.forEach((a, i) => parts.slice(i + 1).forEach((b) => {
    if (overlap(box(a), box(b)))
      problems.push(`order form: ${a.textContent.trim()} overlaps ${b.textContent.trim()}`);
  }));
  form.querySelectorAll("label, input, select, button").forEach((el) => {
    if (!inside(box(el), box(form.closest(".card"))))
      problems.push(`order form: ${el.id || el.textContent.trim()} sticks out of its card`);
  });
  form.querySelectorAll("input").forEach((el) => {
    if (clipped(el)) problems.push(`order form: ${el.id} cuts its value ${el.value}`);
  });
  // every card inside the viewport's width; stats and badges not cut
  document.querySelectorAll(".card, .badge").forEach((el) => {
    const b = box(el);
    if (b.left < -1 || b.right > window.innerWidth + 1)
      problems.push(`${el.id || el.className} is outside the viewport`);
  });
  document.querySelectorAll(".stat .label, .stat .value, .badge, .pill").forEach((el) => {
    if (clipped(el)) problems.push(`cut: ${el.id || el.className} "${el.textContent}"`);
  });
  // the latency table fits its card: no column cut, no scroll
  const latency = document.getElementById("latency");
  const wrap = latency.parentElement;
  if (clipped(wrap))
    problems.push(`the latency table is cut: ${wrap.scrollWidth} > ${wrap.clientWidth}`);
  const last = latency.querySelector("thead th:last-child");
  if (!inside(box(last), box(latency.closest(".card"))))
    problems.push("the latency table's p99 column is outside its card");
  // the workers table too, on a desktop
  const workers = document.getElementById("workers").parentElement;
  if (window.innerWidth >= 1000 && clipped(workers))
    problems.push(`the workers table is cut: ${workers.scrollWidth} > ${workers.clientWidth}`);
  // orders and trades: whole on a desktop; on a phone they may scroll inside their card
  // (a scrollable box: every column reachable), never the page
  document.querySelectorAll(".scroll").forEach((el) => {
    if (!clipped(el)) return;
    if (window.innerWidth >= 1000) problems.push(`${el.firstElementChild.id} is cut`);
    else if (!["auto", "scroll"].includes(getComputedStyle(el).overflowX))
      problems.push(`${el.firstElementChild.id} is cut and cannot scroll`);
  });
  return problems;
}"""

SIZES = {"phone": (390, 844), "laptop": (1280, 800), "desktop": (1920, 1080)}


def _assert_layout(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)
    problems = page.evaluate(LAYOUT_JS)
    assert problems == [], f"{name}: {problems} (see test-artifacts/dashboard-{name}.png)"


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_the_layout_holds_on_phones_and_desktops(
    browser: Browser, server: SampleAppProcess, size: str
) -> None:
    """Nothing overlaps, is cut or scrolls sideways: the page at 390, 1280 and 1920 px
    wide, with orders, a trade and the monitor's tables filled in."""
    from playwright.sync_api import expect

    width, height = SIZES[size]
    context = browser.new_context(viewport={"width": width, "height": height})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        watch = Watch(page, server.url)
        page.goto(f"{server.url}/?token={TOKEN}")
        _connected(page)
        expect(page.locator("#monitor-state")).to_have_attribute("data-state", "connected")
        expect(page.locator("#order-symbol")).to_have_value("BTC.USD")
        symbol = f"LAYOUT.{size[:3].upper()}"  # a book of its own
        sell = _place(page, symbol, "sell", "12.3456", "123456.78")
        _place(page, symbol, "buy", "2.5", "123456.78")
        expect(_order_row(page, sell).locator(".open-qty")).to_have_text("9.8456")
        expect(page.locator('#latency tr[data-event="/trading:place_order"]')).to_be_visible()
        expect(page.locator("#stat-checked-out")).to_have_text(re.compile(r"^\d+ / \d+$"))
        _assert_layout(page, size)
        assert watch.problems() == []
    finally:
        context.close()


def test_every_status_has_a_pill(open_page: OpenPage) -> None:
    """``unhealthy`` and ``draining`` (issue 12) have styles of their own; a status the
    page does not know still shows, in the plain pill."""
    page, _ = open_page()
    _connected(page)
    colors = page.evaluate(
        """() => Object.fromEntries(
          ["healthy", "warning", "exhausted", "unhealthy", "draining", "someday"].map((s) => {
            const pill = document.createElement("span");
            pill.className = "pill status-" + s;
            pill.textContent = s;
            document.body.appendChild(pill);
            const style = getComputedStyle(pill);
            return [s, style.backgroundColor + " " + style.color];
          }))"""
    )
    plain = colors.pop("someday")
    assert colors["unhealthy"] != plain and colors["draining"] != plain
    assert len(set(colors.values())) == len(colors), colors


def test_a_wrong_token_is_refused_and_trading_still_works(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    page, _ = open_page("/?token=wrong")
    _connected(page)
    expect(page.locator("#monitor-state")).to_have_attribute("data-state", "refused")
    expect(page.locator("#monitor-message")).to_contain_text("refused")
    expect(page.locator("#workers tbody tr")).to_have_count(0)
    page.wait_for_timeout(1500)  # the page re-renders the monitor every second
    for stat in ("checked-out", "utilization", "rate", "events", "waiting", "leaks"):
        expect(page.locator(f"#stat-{stat}")).to_have_text("\u2013")  # a dash, not a zero
    expect(page.locator("#monitor-status")).to_have_text("no data")
    assert _place(page, "BRW.W", "buy", "1", "1") > 0


def test_without_a_token_the_page_says_how_to_get_one(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    page, _ = open_page("/")
    _connected(page)
    expect(page.locator("#monitor-state")).to_have_text("monitor: no token")
    expect(page.locator("#monitor-message")).to_contain_text("?token=")


def test_the_page_reconnects_after_a_server_restart(open_page: OpenPage, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    database_url = f"sqlite:///{tmp_path}/restart.db"
    first = _start(database_url, tmp_path / "first.log")
    second: SampleAppProcess | None = None
    try:
        page, watch = open_page(app=first)
        # while the server is down the browser logs its failed reconnection attempts
        # (and any request of the page still in flight, such as the favicon); those
        # are all to the app itself: anything else still fails the test
        origin = re.escape(first.url.replace("http://", ""))
        watch.tolerated.append(re.compile(rf"(ws|http)://{origin}/"))
        _connected(page)
        first.stop()
        expect(page.locator("#trading-state")).to_have_attribute(
            "data-state", re.compile("disconnected|reconnecting")
        )
        expect(page.locator("#trading-state")).to_have_attribute("data-state", "reconnecting")
        # an order that arrives while the page is away is loaded when it comes back
        engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    # on SQLite amounts are whole ticks: qty 7 (tick 0.0001), price 1.5 (0.01)
                    "INSERT INTO orders (symbol, side, qty, filled_qty, price, status, "
                    "created_at) VALUES ('BRW.R', 'buy', 70000, 0, 150, 'open', :now)"
                ),
                {"now": time.time()},
            )
            order_id = conn.execute(sa.text("SELECT max(id) FROM orders")).scalar()
        engine.dispose()
        second = _start(database_url, tmp_path / "second.log", port=first.port)
        _connected(page)
        expect(page.locator("#monitor-state")).to_have_attribute("data-state", "connected")
        expect(_order_row(page, int(order_id))).to_be_visible()
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.postgres
@pytest.mark.redis
def test_several_workers_show_on_one_page(
    open_page: OpenPage, postgres_url: str, pg_schema: str, redis_url: str, tmp_path: Path
) -> None:
    """Two workers on one database and a Redis message queue: the page, connected to
    the first, lists both workers and sees orders placed through the second."""
    import socketio
    from playwright.sync_api import expect

    database_url = schema_url(postgres_url, pg_schema)
    env = {"SOCKETIO_MESSAGE_QUEUE": redis_url}
    first = _start(database_url, tmp_path / "first.log", env=env)
    second: SampleAppProcess | None = None
    try:
        second = _start(database_url, tmp_path / "second.log", async_mode="eventlet", env=env)
        page, _ = open_page(app=first)
        page.set_viewport_size({"width": 1400, "height": 1000})
        _connected(page)
        host = socket.gethostname()
        for worker in (first, second):
            assert worker.proc is not None
            row = page.locator(f'#workers tr[data-worker="{host}:{worker.proc.pid}"]')
            expect(row).to_be_visible()
            expect(row.locator(".pill")).to_have_text("healthy")
        client = socketio.Client(reconnection=False)
        client.connect(second.url, namespaces=["/trading"], wait_timeout=10)
        try:
            ack = client.call(
                "place_order",
                {"symbol": "BRW.MQ", "side": "sell", "qty": 4, "price": 10},
                namespace="/trading",
                timeout=10,
            )
        finally:
            client.disconnect()
        assert ack["ok"] is True
        expect(_order_row(page, ack["order"]["id"])).to_have_attribute("data-status", "open")
        # both workers' latency rows, p99 column included, fit at 1400 px
        expect(page.locator('#latency tr[data-event="/trading:place_order"]')).to_have_count(1)
        expect(page.locator("#latency tbody tr")).not_to_have_count(0)
        _assert_layout(page, "workers-1400")
        page.context.close()  # before the servers go: no reconnection attempts to report
    finally:
        first.stop()
        if second is not None:
            second.stop()
