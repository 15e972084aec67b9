"""Admission control under real load: real servers, real clients, real PostgreSQL.

Every server test starts ``tests.servers.app --extra tests.servers.load`` in each
async mode (threading, eventlet, gevent) and talks to namespace ``/l`` (see
``tests/servers/load.py``) with python-socketio clients over WebSocket. The plain
``flask_socketio.Namespace`` control (``plain=True``) runs the very same handler
bodies without socketio_dbctx.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import socketio
from conftest import REPO_ROOT, ServerProcess, wait_for
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import ContextSetupError, DBContext, DBContextNamespace

NS = "/l"
LOAD = "tests.servers.load"
BUSY = {
    "error": "busy",
    "message": "The server is busy; try again shortly.",
    "retryable": True,
    "retry_after_ms": 500,  # acks.DEFAULT_RETRY_AFTER: a queue timeout has no better hint
}
POOL_TIMEOUT_TEXT = "QueuePool limit"
CALL_TIMEOUT = 30.0

ServerFactory = Callable[..., ServerProcess]
ClientFactory = Callable[..., socketio.Client]


class Acks:
    """Acks of events emitted with ``client.emit(..., callback=...)``, by index."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.acks: dict[int, Any] = {}
        self.lock = threading.Lock()
        self.all_acked = threading.Event()

    def callback(self, index: int) -> Callable[..., None]:
        def record(*args: Any) -> None:
            with self.lock:
                self.acks[index] = args[0] if len(args) == 1 else args
                if len(self.acks) == self.expected:
                    self.all_acked.set()

        return record

    def count(self) -> int:
        with self.lock:
            return len(self.acks)

    def wait_all(self, timeout: float, what: str) -> list[Any]:
        """Every ack in index order; fail the test naming the missing ones."""
        if not self.all_acked.wait(timeout):
            with self.lock:
                missing = sorted(set(range(self.expected)) - set(self.acks))
            pytest.fail(
                f"{len(missing)} of {self.expected} {what} calls got no ack within "
                f"{timeout}s: {missing[:20]}"
            )
        return [self.acks[index] for index in range(self.expected)]


def emit_from_each(clients: Sequence[socketio.Client], event: str, *args: Any) -> Acks:
    """One ``event`` from every client, all at once, acks collected by client index."""
    acks = Acks(len(clients))
    for index, client in enumerate(clients):
        client.emit(event, args, namespace=NS, callback=acks.callback(index))
    return acks


def connect_many(server: ServerProcess, connect_client: ClientFactory, n: int) -> list[Any]:
    return [connect_client(server, NS) for _ in range(n)]


def peaks(server: ServerProcess) -> dict[str, int]:
    """``/_load/peak``: exact and sampled peaks of checked_out, and of waiting."""
    data: dict[str, int] = json.loads(server.get("/_load/peak"))
    return data


def reset_peaks(server: ServerProcess) -> None:
    server.get("/_load/reset")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def assert_no_pool_timeout(server: ServerProcess) -> None:
    log = server.log()
    for text in (POOL_TIMEOUT_TEXT, "TimeoutError"):
        assert text not in log, f"{text!r} in the server log:\n{log[-5000:]}"


# -- the seed scenario (DESIGN section 1) -------------------------------------------------

SEED_CLIENTS = 12
SEED_HOLD = 4.0
SEED_POOL = {"pool_size": 5, "max_overflow": 0, "pool_timeout": 3.0}
#: Chosen so both outcomes show: 5 events run at once (the pool's capacity) for 4 s, the
#: next 5 are admitted after ~4 s of waiting (< 6 s) and done, and the last 2 could only
#: be admitted after ~8 s, so they are answered busy at 6 s. No event waits for the pool.
SEED_QUEUE_TIMEOUT = 6.0


def test_seed_scenario_every_call_is_acked_without_pool_timeouts(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """12 clients whose handler queries, then holds its connection across 4 s of I/O,
    on a pool of 5 + 0 with pool_timeout 3 s: every call is acked (done, or busy
    with retryable true), no checkout times out, nothing hangs, nothing leaks."""
    server = server_factory(
        async_mode,
        **SEED_POOL,
        config={"DBCTX_QUEUE_TIMEOUT": SEED_QUEUE_TIMEOUT},
        extra=[LOAD],
    )
    clients = connect_many(server, connect_client, SEED_CLIENTS)

    acks = emit_from_each(clients, "hold", SEED_HOLD).wait_all(CALL_TIMEOUT, "hold")

    unexpected = [ack for ack in acks if ack is not True and ack != BUSY]
    assert not unexpected, f"acks that are neither done nor busy: {unexpected}"
    done, busy = acks.count(True), acks.count(BUSY)
    # 5 run at once from the start; 10 at most can be admitted before the 6 s timeout
    assert done >= 5 and busy >= 2, f"done={done} busy={busy}: {acks}"
    assert done + busy == SEED_CLIENTS
    assert_no_pool_timeout(server)
    assert peaks(server)["peak"] == 5
    stats = server.wait_checked_out(0)
    assert stats["pool"]["waiting"] == 0
    assert clients[0].call("quick", namespace=NS, timeout=CALL_TIMEOUT) == 1


def test_seed_scenario_control_plain_namespace_loses_calls(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """Control: the same handler in a plain flask_socketio.Namespace. 7 of the 12
    handlers time out waiting for the pool; their calls are never acked."""
    server = server_factory(async_mode, plain=True, **SEED_POOL, extra=[LOAD])
    clients = connect_many(server, connect_client, SEED_CLIENTS)

    acks = emit_from_each(clients, "hold", SEED_HOLD)

    # Every handler has ended once each one either acked or logged its pool timeout;
    # a handler that raised sends no ack, ever.
    def all_ended() -> bool:
        return acks.count() + server.log().count(POOL_TIMEOUT_TEXT) >= SEED_CLIENTS

    wait_for(all_ended, CALL_TIMEOUT, "every plain handler to ack or time out on the pool")
    timeouts = server.log().count(POOL_TIMEOUT_TEXT)
    assert acks.count() == 5, acks.acks
    assert timeouts == SEED_CLIENTS - 5
    assert all(ack is True for ack in acks.acks.values())
    server.wait_checked_out(0)


# -- a flooding client --------------------------------------------------------------------

FLOOD_EVENTS = 300
FLOOD_HOLD = 0.03
WELL_BEHAVED = 3
P95_LIMIT_S = 0.25
MIN_SAMPLES = 30


def test_flooding_client_cannot_starve_the_others(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """One client emits 300 events of 30 ms database work without waiting; meanwhile 3
    well-behaved clients call a quick handler one call at a time. With the default
    per-client limit (4) their p95 stays under 250 ms, and every flooded event is
    acked (done or busy)."""
    server = server_factory(async_mode, pool_size=5, max_overflow=0, extra=[LOAD])
    flooder = connect_client(server, NS)
    good = connect_many(server, connect_client, WELL_BEHAVED)
    for client in good:  # warm the pool: first connections are not what is measured
        assert client.call("quick", namespace=NS, timeout=CALL_TIMEOUT) == 1
    reset_peaks(server)

    flood = Acks(FLOOD_EVENTS)
    start, stop = threading.Event(), threading.Event()

    def behave(client: socketio.Client) -> list[float]:
        latencies = []
        start.wait(CALL_TIMEOUT)
        while not (flood.all_acked.is_set() or stop.is_set()):
            began = time.perf_counter()
            ack = client.call("quick", namespace=NS, timeout=CALL_TIMEOUT)
            latencies.append(time.perf_counter() - began)
            assert ack == 1, ack
        return latencies

    with ThreadPoolExecutor(WELL_BEHAVED) as pool:
        futures = [pool.submit(behave, client) for client in good]
        try:
            for index in range(FLOOD_EVENTS):
                flooder.emit("pg_sleep", FLOOD_HOLD, namespace=NS, callback=flood.callback(index))
                if index == 0:
                    start.set()
            flood_acks = flood.wait_all(CALL_TIMEOUT * 2, "flooded pg_sleep")
        finally:
            start.set()
            stop.set()
        latencies = [value for future in futures for value in future.result(CALL_TIMEOUT)]

    unexpected = [ack for ack in flood_acks if ack is not True and ack != BUSY]
    assert not unexpected, f"flood acks that are neither done nor busy: {unexpected[:5]}"
    assert flood_acks.count(True) > 0
    seen = peaks(server)
    assert seen["waiting_peak"] > 0, f"the flood never queued: {seen}"
    assert latencies, "no well-behaved call ran during the flood"
    p95 = percentile(latencies, 0.95)
    assert p95 < P95_LIMIT_S, (
        f"well-behaved p95 {p95 * 1000:.0f} ms over {len(latencies)} calls (p50 "
        f"{percentile(latencies, 0.5) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms)"
    )
    # enough calls overlapped the flood for the p95 to mean something
    assert len(latencies) >= MIN_SAMPLES, f"only {len(latencies)} calls during the flood"
    assert_no_pool_timeout(server)
    assert server.wait_checked_out(0)["pool"]["waiting"] == 0


# -- the process-wide cap -----------------------------------------------------------------

CAP_HOLD = 3.0


@pytest.mark.parametrize(
    ("pool", "config", "limit"),
    [
        # the default cap is the pool's capacity; a pool checkout would time out (1 s)
        ({"pool_size": 5, "max_overflow": 0, "pool_timeout": 1.0}, {}, 5),
        # a configured cap below the capacity (10) bounds checked_out by itself
        (
            {"pool_size": 5, "max_overflow": 5, "pool_timeout": 10.0},
            {"DBCTX_MAX_CONCURRENT_EVENTS": 3},
            3,
        ),
    ],
    ids=["default-pool-capacity", "configured-3-of-10"],
)
def test_process_cap_bounds_checked_out_and_reports_waiting(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    pool: dict[str, Any],
    config: dict[str, Any],
    limit: int,
) -> None:
    """``limit + 2`` clients each hold a connection for 3 s inside PostgreSQL: at most
    ``limit`` connections are ever checked out, the pool dict shows ``waiting`` while
    events queue, and new clients connect while the process is saturated."""
    server = server_factory(async_mode, **pool, config=config, extra=[LOAD])
    holders = connect_many(server, connect_client, limit + 2)
    reset_peaks(server)

    acks = emit_from_each(holders, "pg_sleep", CAP_HOLD)

    def saturated() -> dict[str, Any] | None:
        stats = server.stats()
        return stats if stats["checked_out"] == limit and stats["pool"]["waiting"] == 2 else None

    stats = wait_for(saturated, 10, f"{limit} connections out and 2 events waiting")
    # a full pool with events waiting is exhausted; 3 of 10 out is healthy
    expected_status = "exhausted" if limit == stats["pool"]["capacity"] else "healthy"
    assert stats["pool"]["status"] == expected_status, stats
    # Connecting is never held back by admission: the new clients get in while no
    # event has finished yet, so no slot has been freed for them.
    newcomers = connect_many(server, connect_client, 2)
    assert acks.count() == 0, f"a holder finished before the newcomers connected: {acks.acks}"
    assert all(client.connected for client in newcomers)
    assert server.stats()["pool"]["waiting"] > 0

    results = acks.wait_all(CALL_TIMEOUT, "pg_sleep")

    assert results == [True] * len(holders)
    seen = peaks(server)
    assert seen["peak"] == limit, seen
    assert 0 < seen["sampled_peak"] <= limit, seen
    assert seen["waiting_peak"] == 2, seen
    assert seen["connects"] == 2, seen
    assert_no_pool_timeout(server)
    assert server.wait_checked_out(0)["pool"]["waiting"] == 0
    assert newcomers[0].call("quick", namespace=NS, timeout=CALL_TIMEOUT) == 1


CHECKOUT_HOLD = 4.0
CHECKOUT_TIMEOUT = 2.0


def test_with_admission_off_a_checkout_wait_shows_as_waiting_and_its_timeout_acks_busy(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """``DBCTX_MAX_CONCURRENT_EVENTS=0``: 7 events on a pool of 5; 2 wait for a checkout
    (2 s pool_timeout) while the others hold their connections for 4 s. Those 2 are
    acked ``busy`` (retryable) when the checkout times out, and while they wait the
    pool dict counts them in ``waiting`` ("events waiting for admission or a
    checkout", DESIGN section 5)."""
    server = server_factory(
        async_mode,
        pool_size=5,
        max_overflow=0,
        pool_timeout=CHECKOUT_TIMEOUT,
        config={"DBCTX_MAX_CONCURRENT_EVENTS": 0},
        extra=[LOAD],
    )
    holders = connect_many(server, connect_client, 7)
    reset_peaks(server)

    acks = emit_from_each(holders, "pg_sleep", CHECKOUT_HOLD)
    polled = []
    while not acks.all_acked.is_set():
        polled.append(server.stats()["pool"]["waiting"])
        acks.all_acked.wait(0.05)
    results = acks.wait_all(CALL_TIMEOUT, "pg_sleep")

    assert sorted(results, key=str) == [True] * 5 + [BUSY] * 2, results
    assert peaks(server)["peak"] == 5
    server.wait_checked_out(0)
    seen = peaks(server)
    assert max(polled) == 2 and seen["waiting_peak"] == 2, (
        f"2 events waited {CHECKOUT_TIMEOUT} s for a checkout, but the pool dict's "
        f"waiting peaked at {max(polled)} (polled /_stats) and {seen['waiting_peak']} "
        f"(sampled in the server)"
    )


# -- configuration (test-client level) ------------------------------------------------------


def _bare_app(tmp_path: Path) -> tuple[Flask, SQLAlchemy, SocketIO]:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'admission.db'}"
    db = SQLAlchemy()
    db.init_app(app)
    return app, db, SocketIO(app, async_mode="threading")


BAD_VALUES: list[tuple[str, Any]] = [
    *[
        (name, value)
        for name in ("max_in_flight_per_client", "max_concurrent_events")
        for value in (-1, 1.5, "4", True, float("nan"), [4])
    ],
    ("max_in_flight_per_client", None),
    *[
        ("queue_timeout", value)
        for value in (-1, -0.001, "10", False, None, float("nan"), float("inf"))
    ],
]


@pytest.mark.parametrize("source", ["app.config", "option"])
@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=repr)
def test_bad_admission_config_is_rejected_at_init(
    source: str, name: str, value: Any, tmp_path: Path
) -> None:
    """A bad admission value raises ContextSetupError naming the key, and nothing is
    registered: no extension, no monitor namespace, no connection taken."""
    app, db, sio = _bare_app(tmp_path)
    app.config["DBCTX_MONITOR_AUTH"] = "token"
    options: dict[str, Any] = {}
    if source == "app.config":
        app.config[f"DBCTX_{name.upper()}"] = value
    else:
        options[name] = value
    dbctx = DBContext()

    with pytest.raises(ContextSetupError, match=f"DBCTX_{name.upper()}"):
        dbctx.init_app(app, sio, db, **options)

    assert "dbctx" not in app.extensions
    assert "/monitor" not in sio.server.handlers
    with app.app_context():
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # the app can still be set up once the value is fixed
    app.config.pop(f"DBCTX_{name.upper()}", None)
    dbctx.init_app(app, sio, db)
    assert app.extensions["dbctx"] is dbctx


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_in_flight_per_client", 0),
        ("max_in_flight_per_client", 1),
        ("max_concurrent_events", 0),
        ("max_concurrent_events", None),
        ("max_concurrent_events", 7),
        ("queue_timeout", 0),
        ("queue_timeout", 0.5),
    ],
    ids=repr,
)
def test_boundary_admission_config_is_accepted(name: str, value: Any, tmp_path: Path) -> None:
    app, db, sio = _bare_app(tmp_path)
    app.config[f"DBCTX_{name.upper()}"] = value
    dbctx = DBContext(app, sio, db)
    assert getattr(dbctx.settings(app), name) == value


@pytest.mark.parametrize(
    ("name", "value"), [("max_in_flight_per_client", -1), ("queue_timeout", -1.0)], ids=repr
)
def test_bad_namespace_admission_override_is_rejected(
    name: str, value: Any, tmp_path: Path
) -> None:
    """A bad per-namespace class attribute is a ContextSetupError naming the key at the
    namespace's first event, before any handler runs or any connection is taken."""
    app, db, sio = _bare_app(tmp_path)
    DBContext(app, sio, db)
    ran: list[str] = []

    class Bad(DBContextNamespace):
        def on_quick(self) -> int:
            ran.append("quick")
            return 1

    setattr(Bad, name, value)
    sio.on_namespace(Bad(NS))
    client = sio.test_client(app, namespace=NS)

    with pytest.raises(ContextSetupError, match=f"DBCTX_{name.upper()}"):
        client.emit("quick", namespace=NS, callback=True)

    assert ran == []
    with app.app_context():
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- the async mode's own semaphores --------------------------------------------------------

GREEN_SCRIPT = """
import json, sys
mode, shared = sys.argv[1], sys.argv[2] == "process"
if mode == "eventlet":
    import eventlet
    spawn, sleep, join = eventlet.spawn, eventlet.sleep, lambda gs: [g.wait() for g in gs]
else:
    import gevent
    spawn, sleep, join = gevent.spawn, gevent.sleep, gevent.joinall
from socketio_dbctx.admission import Admission, ProcessLimit
from socketio_dbctx.errors import BusyError

# No monkey patching: only the async mode's own semaphore lets the holder run while
# the waiter waits; a threading semaphore would block the whole hub until the timeout.
admission = Admission(ProcessLimit(mode, 1 if shared else 0), 0 if shared else 1, 5.0)
order = []

def hold():
    order.append("holder in")
    sleep(0.2)
    order.append("holder out")

def run(sid, work):
    try:
        admission.run(sid, work)
    except BusyError:
        order.append(f"{sid} busy")

first = spawn(run, "a", hold)
sleep(0.05)
second = spawn(run, "b" if shared else "a", lambda: order.append("waiter in"))
join([first, second])
print(json.dumps(order))
"""


@pytest.mark.parametrize("limit", ["process", "per-client"])
@pytest.mark.parametrize("mode", ["eventlet", "gevent"])
def test_admission_waits_greenly_without_monkey_patching(mode: str, limit: str) -> None:
    """Under eventlet and gevent a queued event waits on a green semaphore: the event
    holding the slot keeps running and the waiter is admitted when it leaves. Runs in
    a subprocess (eventlet must not be imported here)."""
    result = subprocess.run(
        [sys.executable, "-c", GREEN_SCRIPT, mode, limit],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    order = json.loads(result.stdout.strip().splitlines()[-1])
    assert order == ["holder in", "holder out", "waiter in"], result.stderr
