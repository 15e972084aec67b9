"""Nothing lost, nothing doubled: the sample app's orders under database faults.

For each fault, a fresh PostgreSQL schema, a ``TcpProxy`` (``tests/tcp_proxy.py``) in
front of PostgreSQL (``sslmode=disable``, so it sees the protocol) and one sample app
worker (``python -m sample_app``, threading, its defaults: ``DBCTX_STATEMENT_TIMEOUT``
5 s) behind it. ``--clients`` python-socketio clients place orders on ``/trading`` for
``--seconds`` while the fault is injected again and again:

* ``none``: no fault (the baseline);
* ``kill``: every app backend terminated from outside (``pg_terminate_backend``) once a
  second;
* ``refuse``: the proxy closes every connection and refuses new ones for 0.8 s, every 2 s
  (:meth:`TcpProxy.cut`, then :meth:`TcpProxy.restore`);
* ``blackhole``: the proxy closes every connection and accepts new ones without ever
  answering them for 1 s, every 2.5 s;
* ``lost_commit``: the answer to a COMMIT is dropped and that connection closed: the
  COMMIT happened, the app only sees its connection break (:meth:`TcpProxy.cut_next_commit`,
  armed again as soon as the previous one was used, at most every 0.25 s);
* ``lost_commit_down``: the same, and the proxy then refuses every connection for 5 s
  (``cut_next_commit(after="refuse")``): the library cannot ask ``txid_status()`` in time;
  the answer must not say the order failed (``outcome_unknown``, and the client resends
  with its ``client_order_id``); this fault runs for at least 7 s and needs a
  ``tests/tcp_proxy.py`` with ``cut_next_commit(after=...)``;
* ``freeze``: nothing forwarded either way for ``--freeze`` seconds (default 3), connections
  kept open (:meth:`TcpProxy.partition`), then :meth:`TcpProxy.restore`; repeated after 2 s;
* ``long_freeze``: the same for 8 s, longer than the sample's bound for a hung database
  (``DBCTX_STATEMENT_TIMEOUT`` + 1.5 s = 6.5 s, when the library's watchdog shuts a stuck
  connection down), so stuck events are answered ``timeout`` or ``outcome_unknown`` and
  resent; this fault runs for at least 10 s.

Each order carries a fresh ``client_order_id`` (the sample's idempotency key) and a
quantity no other order of the run has, so every stored row is matched to its request.
A client resends an order as the sample page does: after no answer within 10 s, ``busy``,
``timeout`` or ``outcome_unknown``, with the same ``client_order_id``, at most 3 times,
after ``retry_after_ms`` (or 500 ms, doubling); once a send's fate was unknown (no answer,
``outcome_unknown``) it also resends on ``db_unavailable``, for up to 30 s. Afterwards
every request's final answer is checked against the ``orders`` table (read directly, not
through the proxy), and the app's pool must be back to 0 connections checked out.

Columns: ``requests`` orders placed (one per client order id, resends not counted);
``resends`` (and the answers that caused them); ``ok, stored once`` final answer ``ok``
and exactly one row, the one acked;
``failed, not stored`` final answer an error other than ``outcome_unknown`` and no row;
``outcome_unknown`` final answer ``outcome_unknown`` (must be 0 on PostgreSQL: the
library resolves a lost COMMIT with ``txid_status()``); ``duplicates`` requests with more
than one row (must be 0); ``no ack`` sends never answered, not even late (must be 0);
``violations`` answered ``ok`` but no row (or another row), answered failed but stored,
rows no request made (must be 0). The exit status is 1 when any of the must-be-0 columns
is not, 2 when the benchmark could not run.

Run from the repository root::

    python benchmarks/nothing_lost.py [--clients 10] [--seconds 10] [--faults kill,freeze]
    python benchmarks/nothing_lost.py --quick     # 4 clients, 3 s per fault (10 s long_freeze)

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import socketio
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "benchmarks", ROOT):  # also when imported (the tests do)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _harness import environment, positive_float, positive_int, table  # noqa: E402

from sample_app.load import LoadClient  # noqa: E402
from sample_app.money import QTY_TICK, to_wire  # noqa: E402
from sample_app.process import SampleAppProcess, StartError  # noqa: E402
from tests.tcp_proxy import TcpProxy  # noqa: E402

POSTGRES_URL = os.environ.get(
    "DBCTX_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
NS = "/trading"
TOKEN = "nothing-lost-benchmark"
FAULTS = (
    "none", "kill", "refuse", "blackhole", "lost_commit", "lost_commit_down", "freeze",
    "long_freeze",
)  # fmt: skip
#: lost_commit_down: seconds the database stays refused after the lost COMMIT: longer
#: than the library's txid_status() attempts (about 2.5 s) and the page's three resends
#: after them (a database fail-over takes longer still)
DOWN_AFTER_COMMIT = 5.0
#: Past the sample's client-side bound for a hung database: DBCTX_STATEMENT_TIMEOUT (5 s)
#: + 1.5 s, after which the watchdog shuts the stuck connection down.
LONG_FREEZE = 8.0
SYMBOLS = ("BTC.USD", "ETH.USD")
#: libpq's connect timeout in the app's URL: a connect into a black hole ends after it.
CONNECT_TIMEOUT = 2
#: The sample page's resend policy (sample_app/static/app.js).
ACK_TIMEOUT = 10.0
RESENDS = 3
RESEND_CODES = frozenset({"no_answer", "busy", "timeout", "outcome_unknown"})
RESEND_WAIT = 0.5
#: Once a send's fate is unknown (no answer, outcome_unknown), the page keeps resending
#: the same id, ``db_unavailable`` included, with backoff, for this long.
UNCERTAIN_FOR = 30.0
UNCERTAIN_CODES = frozenset({"no_answer", "outcome_unknown"})
#: After the last send, how long a late ack may still come.
GRACE = 20.0


class BenchError(Exception):
    """The benchmark could not run (no database, the app did not start, ...)."""


# -- requests and what came back ---------------------------------------------------------


@dataclass
class Attempt:
    """One send of an order; ``ack`` is set by the reader thread when it arrives."""

    sent: float
    ack: Any = None
    #: what the client made of it when it decided (``no_answer`` after the ack timeout)
    seen: str = ""
    answered: threading.Event = field(default_factory=threading.Event)

    def record(self, *ack_args: Any) -> None:
        self.ack = ack_args[0] if len(ack_args) == 1 else list(ack_args)
        self.answered.set()


@dataclass
class Request:
    """One order (one ``client_order_id``) and every send of it."""

    client_order_id: str
    qty: Decimal
    payload: dict[str, Any]
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def final(self) -> Any:
        """The last send's ack; ``None`` when it never came."""
        last = self.attempts[-1]
        return last.ack if last.answered.is_set() else None


def code(ack: Any) -> str:
    """``ok``, an error code, ``no_answer`` or ``unexpected``."""
    if ack is None:
        return "no_answer"
    if isinstance(ack, dict):
        if ack.get("ok") is True and isinstance(ack.get("order"), dict):
            return "ok"
        if isinstance(ack.get("error"), str):
            return str(ack["error"])
    return "unexpected"


@dataclass
class Outcome:
    """One table row: what happened to a fault's requests."""

    fault: str
    requests: int = 0
    resends: int = 0
    ok_once: int = 0
    failed_not_stored: int = 0
    outcome_unknown: int = 0
    duplicates: int = 0
    no_ack: int = 0
    violations: int = 0
    injected: str = ""
    final_errors: Counter[str] = field(default_factory=Counter)
    resent_after: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def bad(self) -> bool:
        return bool(self.outcome_unknown or self.duplicates or self.no_ack or self.violations)

    def row(self) -> list[Any]:
        def must_be_zero(value: int) -> str:
            return f"**{value}**" if value else "0"

        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.final_errors.items())) or "-"
        resent = ", ".join(f"{k} {v}" for k, v in sorted(self.resent_after.items()))
        return [
            self.fault,
            self.injected,
            self.requests,
            f"{self.resends} ({resent})" if resent else self.resends,
            self.ok_once,
            self.failed_not_stored,
            must_be_zero(self.outcome_unknown),
            must_be_zero(self.duplicates),
            must_be_zero(self.no_ack),
            must_be_zero(self.violations),
            errors,
        ]


HEADERS = [
    "fault", "injected", "requests", "resends", "ok, stored once", "failed, not stored",
    "outcome_unknown", "duplicates", "no ack", "violations", "final errors",
]  # fmt: skip


def check(
    fault: str, requests: Sequence[Request], stored: Sequence[tuple[int, Decimal]]
) -> Outcome:
    """Every request's final answer against the stored ``(order id, qty)`` rows."""
    out = Outcome(fault, requests=len(requests))
    by_qty: dict[Decimal, list[int]] = {}
    for order_id, qty in stored:
        by_qty.setdefault(qty, []).append(order_id)
    known = set()
    for request in requests:
        known.add(request.qty)
        out.resends += len(request.attempts) - 1
        out.resent_after.update(a.seen for a in request.attempts[:-1])
        out.no_ack += sum(not a.answered.is_set() for a in request.attempts)
        rows = by_qty.get(request.qty, [])
        final = request.final
        kind = code(final)
        cid = request.client_order_id
        if len(rows) > 1:
            out.duplicates += 1
            out.problems.append(f"{cid}: stored {len(rows)} times (ids {rows}), answer {kind}")
        if kind == "ok":
            acked_id = final["order"].get("id")
            if not rows:
                out.violations += 1
                out.problems.append(f"{cid}: answered ok (order {acked_id}) but not stored")
            elif acked_id not in rows:
                out.violations += 1
                out.problems.append(f"{cid}: answered order {acked_id}, stored as {rows}")
            elif len(rows) == 1:
                out.ok_once += 1
        elif kind == "outcome_unknown":
            out.outcome_unknown += 1
            out.problems.append(f"{cid}: final answer outcome_unknown ({len(rows)} stored)")
        elif kind == "no_answer":
            pass  # counted in no_ack
        else:
            out.final_errors[kind] += 1
            if rows:
                out.violations += 1
                out.problems.append(f"{cid}: answered {kind} but stored (ids {rows})")
            else:
                out.failed_not_stored += 1
    strays = [order_id for qty, ids in by_qty.items() if qty not in known for order_id in ids]
    if strays:
        out.violations += len(strays)
        out.problems.append(f"rows no request made: order ids {strays[:20]}")
    return out


# -- the clients -------------------------------------------------------------------------


class Quantities:
    """Unique quantities for the whole run: n * 0.0001 + 1, n = 1, 2, ..."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    def next_qty(self) -> Decimal:
        with self._lock:
            self._n += 1
            return (Decimal(1) + self._n * QTY_TICK).quantize(QTY_TICK)


def new_request(rng: random.Random, numbers: Quantities) -> Request:
    qty = numbers.next_qty()
    cid = uuid.uuid4().hex
    payload = {
        "symbol": rng.choice(SYMBOLS),
        "side": rng.choice(("buy", "sell")),
        "qty": to_wire(qty),
        "price": f"{rng.uniform(99, 101):.2f}",  # buys and sells cross: some trade
        "client_order_id": cid,
    }
    return Request(cid, qty, payload)


def place(client: socketio.Client, request: Request) -> None:
    """Send ``request`` and resend it like the sample page, until a final answer."""
    uncertain_since: float | None = None
    while True:
        attempt = Attempt(time.monotonic())
        request.attempts.append(attempt)
        # not connected: as good as no answer
        with contextlib.suppress(socketio.exceptions.SocketIOError):
            client.emit("place_order", request.payload, namespace=NS, callback=attempt.record)
        attempt.answered.wait(ACK_TIMEOUT)
        ack = attempt.ack if attempt.answered.is_set() else None
        kind = attempt.seen = code(ack)
        if uncertain_since is None and kind in UNCERTAIN_CODES:
            uncertain_since = time.monotonic()
        again = kind in RESEND_CODES and len(request.attempts) <= RESENDS
        still_unknown = (
            uncertain_since is not None
            and (kind in RESEND_CODES or kind == "db_unavailable")
            and time.monotonic() - uncertain_since < UNCERTAIN_FOR
        )
        if not (again or still_unknown):
            return
        wait = min(RESEND_WAIT * 2 ** (len(request.attempts) - 1), 4.0)
        if isinstance(ack, dict) and isinstance(ack.get("retry_after_ms"), (int, float)):
            wait = max(0.0, float(ack["retry_after_ms"]) / 1000)
        time.sleep(wait)


def client_loop(
    client: socketio.Client,
    index: int,
    end_at: float,
    rate: float,
    numbers: Quantities,
    out: list[Request],
) -> None:
    """Place orders at ``rate`` a second (fewer when answers are slow) until ``end_at``."""
    rng = random.Random(index)
    interval = 1.0 / rate
    next_at = time.monotonic() + rng.uniform(0, interval)
    while True:
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        if time.monotonic() >= end_at:
            return
        request = new_request(rng, numbers)
        out.append(request)
        place(client, request)
        next_at = max(next_at + interval, time.monotonic())


# -- faults ------------------------------------------------------------------------------


@dataclass
class Injection:
    """Counts what an injector did, for the table's ``injected`` column."""

    count: int = 0
    detail: Callable[[], str] = lambda: ""


def _sleep(stop: threading.Event, seconds: float) -> bool:
    """Sleep, or return True at once when ``stop`` is set."""
    return stop.wait(seconds)


def inject(
    fault: str,
    proxy: TcpProxy,
    admin: sa.Engine,
    app_name: str,
    stop: threading.Event,
    freeze: float,
    done: Injection,
) -> None:
    """Inject ``fault`` again and again until ``stop``; leave the proxy forwarding."""
    if _sleep(stop, 1.0):  # a warm pool first
        return
    try:
        if fault == "kill":
            rounds = 0
            done.detail = lambda: f"{rounds} rounds, {done.count} backends killed"
            while not stop.is_set():
                rounds += 1
                with admin.connect() as conn:
                    killed: int = conn.execute(
                        sa.text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = :name"
                        ),
                        {"name": app_name},
                    ).scalar_one()
                done.count += int(killed)
                _sleep(stop, 1.0)
        elif fault == "refuse":
            done.detail = lambda: f"{done.count} x 0.8 s refused"
            while not stop.is_set():
                proxy.cut()
                done.count += 1
                _sleep(stop, 0.8)
                proxy.restore()
                _sleep(stop, 1.2)
        elif fault == "blackhole":
            done.detail = lambda: f"{done.count} x 1 s black hole"
            while not stop.is_set():
                proxy.blackhole()
                done.count += 1
                _sleep(stop, 1.0)
                proxy.restore()
                _sleep(stop, 1.5)
        elif fault == "lost_commit":
            done.detail = lambda: f"{proxy.commits_cut} COMMIT answers lost"
            while not stop.is_set():
                if done.count <= proxy.commits_cut:  # the last one was used: arm again
                    proxy.cut_next_commit()
                    done.count += 1
                _sleep(stop, 0.25)
        elif fault == "lost_commit_down":
            if "after" not in inspect.signature(proxy.cut_next_commit).parameters:
                raise BenchError("lost_commit_down needs TcpProxy.cut_next_commit(after=...)")
            done.detail = lambda: f"{proxy.commits_cut} COMMIT answers lost, then down"
            while not stop.is_set():
                cut_next_commit: Any = proxy.cut_next_commit  # after=: newer proxies only
                cut_next_commit(after="refuse")
                done.count += 1
                while proxy.state == "forwarding" and not stop.wait(0.02):
                    pass
                if proxy.state != "forwarding":  # a COMMIT was cut: down for the whole time
                    time.sleep(DOWN_AFTER_COMMIT)
                proxy.restore()
                _sleep(stop, 1.0)
        elif fault in ("freeze", "long_freeze"):
            seconds = freeze if fault == "freeze" else LONG_FREEZE
            done.detail = lambda: f"{done.count} x {seconds:g} s frozen"
            while not stop.is_set():
                proxy.partition()
                done.count += 1
                _sleep(stop, seconds)
                proxy.restore()
                _sleep(stop, 2.0)
        elif fault != "none":
            raise BenchError(f"unknown fault {fault!r}")
    finally:
        if proxy.state != "forwarding":
            proxy.restore()


# -- one fault, end to end ---------------------------------------------------------------


@contextlib.contextmanager
def fresh_schema(admin: sa.Engine) -> Iterator[str]:
    name = f"lost_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def app_url(proxy: TcpProxy, schema: str, app_name: str) -> str:
    """The app's URL: through the proxy, no TLS, its own schema and application_name."""
    url = sa.engine.make_url(POSTGRES_URL)
    proxied = url.set(host="127.0.0.1", port=proxy.port).update_query_dict(
        {
            "sslmode": "disable",
            "application_name": app_name,
            "connect_timeout": str(CONNECT_TIMEOUT),
        }
    )
    text = proxied.render_as_string(hide_password=False)
    return f"{text}&options=-csearch_path%3D{schema}"


def checked_out(monitor: socketio.Client) -> int | None:
    """The app's pool ``checked_out`` from ``get_status``; None when refused (rate limit)."""
    status = monitor.call("get_status", namespace="/monitor", timeout=10)
    if not isinstance(status, dict) or "pools" not in status:
        return None
    return int(status["pools"]["default"]["checked_out"])


def wait_pool_idle(monitor: socketio.Client, timeout: float) -> int:
    """Poll until nothing is checked out; the last value seen."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        value = checked_out(monitor)
        if value is not None:
            last = value
            if value == 0:
                return 0
        time.sleep(0.5)
    return last


def run_fault(
    fault: str, args: argparse.Namespace, admin: sa.Engine, numbers: Quantities
) -> Outcome:
    target = sa.engine.make_url(POSTGRES_URL)
    with contextlib.ExitStack() as stack:
        schema = stack.enter_context(fresh_schema(admin))
        app_name = f"nothing-lost-{schema}"
        proxy = stack.enter_context(TcpProxy(target.host or "127.0.0.1", target.port or 5432))
        log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nothing-lost-")))
        app = SampleAppProcess(
            app_url(proxy, schema, app_name),
            token=TOKEN,
            async_mode=args.async_mode,
            log_path=log / "app.log",
        )
        try:
            stack.enter_context(app)
        except StartError as exc:
            raise BenchError(str(exc)) from None
        try:
            return _drive(fault, args, admin, app, proxy, app_name, schema, numbers)
        except BaseException:
            print(f"--- sample app log ({fault}) ---\n{app.log()[-4000:]}", file=sys.stderr)
            raise


def _drive(
    fault: str,
    args: argparse.Namespace,
    admin: sa.Engine,
    app: SampleAppProcess,
    proxy: TcpProxy,
    app_name: str,
    schema: str,
    numbers: Quantities,
) -> Outcome:
    clients: list[socketio.Client] = []
    monitor = socketio.Client(reconnection=False)
    try:
        for _ in range(args.clients):
            client = LoadClient(reconnection=False)
            client.connect(app.url, namespaces=[NS], transports=["websocket"], wait_timeout=30)
            clients.append(client)
        monitor.connect(
            app.url, namespaces=["/monitor"], auth={"token": TOKEN}, transports=["websocket"]
        )
        stop = threading.Event()
        injection = Injection()
        injector = threading.Thread(
            target=inject,
            args=(fault, proxy, admin, app_name, stop, args.freeze, injection),
            daemon=True,
        )
        per_client: list[list[Request]] = [[] for _ in clients]
        seconds = args.seconds
        if fault in ("long_freeze", "lost_commit_down"):  # at least one whole fault
            seconds = max(
                seconds, 2 + (LONG_FREEZE if fault == "long_freeze" else DOWN_AFTER_COMMIT)
            )
        end_at = time.monotonic() + seconds
        threads = [
            threading.Thread(
                target=client_loop,
                args=(client, i, end_at, args.rate, numbers, per_client[i]),
                daemon=True,
            )
            for i, client in enumerate(clients)
        ]
        injector.start()
        for thread in threads:
            thread.start()
        time.sleep(max(0.0, end_at - time.monotonic()))
        stop.set()
        injector.join(30)
        # each client finishes the order in hand: at most 4 sends and 3 waits
        limit = (RESENDS + 1) * ACK_TIMEOUT + RESENDS * 5 + 10 + UNCERTAIN_FOR
        for thread in threads:
            thread.join(max(0.0, end_at + limit - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise BenchError("a client did not finish its last order in time")
        requests = [r for rs in per_client for r in rs]
        _wait_late_acks(requests)
        with admin.connect() as conn:
            rows = conn.execute(sa.text(f'SELECT id, qty FROM "{schema}".orders'))
            stored = [(int(row[0]), Decimal(row[1])) for row in rows]
        outcome = check(fault, requests, stored)
        outcome.injected = injection.detail() or "-"
        idle = wait_pool_idle(monitor, 30)
        if idle != 0:
            outcome.violations += 1
            outcome.problems.append(f"the pool still has {idle} connection(s) checked out")
        return outcome
    finally:
        for client in [*clients, monitor]:
            with contextlib.suppress(Exception):
                client.disconnect()


def _wait_late_acks(requests: Sequence[Request]) -> None:
    """Until every send is answered, or :data:`GRACE` after the last send."""
    sends = [a for r in requests for a in r.attempts]
    if not sends:
        return
    deadline = max(a.sent for a in sends) + ACK_TIMEOUT + GRACE
    for attempt in sends:
        attempt.answered.wait(max(0.0, deadline - time.monotonic()))


# -- main --------------------------------------------------------------------------------


def default_faults() -> list[str]:
    """Every fault, without ``lost_commit_down`` when the proxy cannot refuse right after
    a lost COMMIT (``cut_next_commit(after=...)``)."""
    if "after" in inspect.signature(TcpProxy.cut_next_commit).parameters:
        return list(FAULTS)
    return [f for f in FAULTS if f != "lost_commit_down"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=positive_int, default=10, help="default 10")
    parser.add_argument(
        "--seconds", type=positive_float, default=10.0, help="per fault (default 10)"
    )
    parser.add_argument(
        "--faults",
        default=",".join(default_faults()),
        help=f"comma-separated, of {', '.join(FAULTS)} (default: all that "
        "tests/tcp_proxy.py can inject)",
    )
    parser.add_argument(
        "--rate", type=positive_float, default=10.0, help="orders a second per client (default 10)"
    )
    parser.add_argument(
        "--freeze", type=positive_float, default=3.0, help="seconds of each freeze (default 3)"
    )
    parser.add_argument(
        "--async-mode", choices=("threading", "gevent", "eventlet"), default="threading"
    )
    parser.add_argument("--quick", action="store_true", help="4 clients, 3 s a fault, 2 s freezes")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        parser.error(f"--faults: unknown {', '.join(unknown) or '(none given)'}")
    args.faults = faults
    if args.quick:
        args.clients, args.seconds, args.freeze = 4, 3.0, 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    admin = sa.create_engine(
        POSTGRES_URL, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 3}
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        print(f"could not run: PostgreSQL unreachable: {type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"# nothing lost: the sample app's orders under database faults ({args.async_mode})\n")
    print(environment(f"{args.async_mode}, one sample app worker"))
    print(
        f"- {args.clients} clients x {args.rate:g} orders/s for {args.seconds:g} s per fault; "
        f"resends like the page (after {ACK_TIMEOUT:g} s without an answer, busy, timeout, "
        f"outcome_unknown; at most {RESENDS}); PostgreSQL through tests/tcp_proxy.py, "
        f"connect_timeout={CONNECT_TIMEOUT}\n",
        flush=True,
    )
    started = time.monotonic()
    numbers = Quantities()
    outcomes = []
    try:
        for fault in args.faults:
            outcomes.append(run_fault(fault, args, admin, numbers))
            print(f"done: {fault}", file=sys.stderr, flush=True)
    except BenchError as exc:
        print(f"could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        admin.dispose()
    print(table(HEADERS, [o.row() for o in outcomes], right=2))
    for outcome in outcomes:
        for problem in outcome.problems[:20]:
            print(f"- {outcome.fault}: {problem}")
        if len(outcome.problems) > 20:
            print(f"- {outcome.fault}: ... and {len(outcome.problems) - 20} more")
    print(f"\ntotal time {time.monotonic() - started:.0f} s")
    return 1 if any(o.bad for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
