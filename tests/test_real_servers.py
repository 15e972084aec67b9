"""Real servers, real clients: the foundation's behaviour under real concurrency.

Every test starts ``tests.servers.app`` in a subprocess in each async mode
(threading, eventlet, gevent) against PostgreSQL (and MariaDB, where it says so), and
talks to it with real python-socketio clients over WebSocket. ``/_stats`` reports the
pool from inside the server process.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest
import socketio
from conftest import ServerProcess, wait_for

pytestmark = [pytest.mark.server, pytest.mark.postgres]

NS = "/t"
# Must match tests/servers/app.py (not imported here: it may monkey-patch).
BOOM_SECRET = "boom-secret-detail"

ServerFactory = Callable[..., ServerProcess]
ClientFactory = Callable[..., socketio.Client]


def emit_all(
    client: socketio.Client, event: str, payloads: list[Any], timeout: float
) -> list[Any]:
    """Emit every payload at once (no waiting in between), then wait for every ack.

    :returns: the acks in payload order; fails the test when any ack is missing.
    """
    acks: dict[int, Any] = {}
    lock = threading.Lock()
    all_acked = threading.Event()

    def callback_for(index: int) -> Callable[..., None]:
        def callback(*args: Any) -> None:
            with lock:
                acks[index] = args[0] if len(args) == 1 else args
                if len(acks) == len(payloads):
                    all_acked.set()

        return callback

    for index, payload in enumerate(payloads):
        client.emit(event, payload, namespace=NS, callback=callback_for(index))
    if not all_acked.wait(timeout):
        with lock:
            missing = sorted(set(range(len(payloads))) - set(acks))
        pytest.fail(f"{len(missing)} of {len(payloads)} {event!r} calls got no ack: {missing}")
    return [acks[index] for index in range(len(payloads))]


def sample_stats(server: ServerProcess, count: int, spacing: float) -> list[dict[str, Any]]:
    """``count`` snapshots of ``/_stats``, ``spacing`` seconds apart."""
    samples = []
    for _ in range(count):
        samples.append(server.stats())
        time.sleep(spacing)
    return samples


@pytest.mark.parametrize("server_database", ["postgres", "mariadb"], indirect=True)
def test_many_clients_writing_at_once(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """20 clients x 10 writes in flight at once on a 5-connection pool: every call is
    acked with an id, every row is stored once, and every connection comes back."""
    server = server_factory(async_mode, pool_size=5, max_overflow=0)
    clients = [connect_client(server) for _ in range(20)]
    barrier = threading.Barrier(len(clients))

    def run(index: int, client: socketio.Client) -> list[Any]:
        barrier.wait(timeout=30)
        return emit_all(client, "write", [f"c{index}-m{n}" for n in range(10)], timeout=60)

    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(run, index, client) for index, client in enumerate(clients)]
        acks = [ack for future in futures for ack in future.result(timeout=90)]

    assert len(acks) == 200
    bad = [ack for ack in acks if not (isinstance(ack, dict) and isinstance(ack.get("id"), int))]
    assert not bad, f"acks without an id: {bad[:5]}"
    assert len({ack["id"] for ack in acks}) == 200
    assert clients[0].call("count", namespace=NS, timeout=10) == 200
    stats = server.wait_checked_out(0)
    assert stats["pool"]["checked_out"] == 0


def test_failing_handler_acks_a_safe_error_and_rolls_back(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    server = server_factory(async_mode)
    client = connect_client(server)

    ack = client.call("boom", "boom-row", namespace=NS, timeout=10)

    assert isinstance(ack, dict), ack
    assert ack["error"] == "internal_error"
    assert ack["retryable"] is False
    assert isinstance(ack["message"], str) and ack["message"]
    assert "detail" not in ack
    text = json.dumps(ack)
    assert BOOM_SECRET not in text and "RuntimeError" not in text and "SELECT" not in text
    # the row the handler flushed before raising was rolled back
    assert client.call("count", "boom-row", namespace=NS, timeout=10) == 0
    server.wait_checked_out(0)
    # the traceback went to the server's log instead
    wait_for(lambda: BOOM_SECRET in server.log(), 10, "the boom traceback in the server log")
    # and the connection is still usable
    assert isinstance(client.call("write", "after", namespace=NS, timeout=10)["id"], int)
    assert client.call("count", namespace=NS, timeout=10) == 1


def test_failing_handler_control_plain_namespace_sends_no_ack(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """Control: the same handler body in a plain flask_socketio.Namespace never acks."""
    server = server_factory(async_mode, plain=True)
    client = connect_client(server)
    assert isinstance(client.call("write", "plain", namespace=NS, timeout=10), dict)
    with pytest.raises(socketio.exceptions.TimeoutError):
        client.call("boom", "boom-row", namespace=NS, timeout=3)


def test_naive_background_loop_holds_a_connection(
    async_mode: str, server_factory: ServerFactory
) -> None:
    """Control: ``with app.app_context(): while True: query; sleep`` keeps a connection
    checked out the whole time, sleeps included."""
    server = server_factory(async_mode)
    assert server.stats()["checked_out"] == 0
    server.get("/_start_loop?mode=naive")
    wait_for(lambda: server.stats()["loop_runs"] >= 3, 10, "the naive loop to run")

    samples = sample_stats(server, 15, 0.03)

    assert samples[-1]["loop_runs"] > samples[0]["loop_runs"], "the loop stopped running"
    held = [s["checked_out"] for s in samples]
    assert all(n >= 1 for n in held), held


def test_periodic_task_holds_no_connection_between_runs(
    async_mode: str, server_factory: ServerFactory
) -> None:
    """``dbctx.start_periodic_task`` runs the same query at the same rate, each run in
    its own scope: between runs nothing is checked out."""
    server = server_factory(async_mode)
    server.get("/_start_loop?mode=periodic")
    wait_for(lambda: server.stats()["loop_runs"] >= 3, 10, "the periodic task to run")
    # a 0 shows up while the task keeps running
    wait_for(lambda: server.stats()["checked_out"] == 0, 5, "checked_out to drop to 0")

    samples = sample_stats(server, 20, 0.03)

    runs = samples[-1]["loop_runs"] - samples[0]["loop_runs"]
    assert runs >= 5, f"the periodic task ran only {runs} times while sampled"
    held = [s["checked_out"] for s in samples]
    # Each run holds a connection for one SELECT 1 of a 50 ms period: most samples
    # see none. (The naive loop above holds one in every sample.)
    assert held.count(0) >= len(held) // 2, held
    assert max(held) <= 1, held


def test_handlers_holding_connections_while_sleeping(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """5 handlers hold a connection across ``socketio.sleep(1)`` at once on a pool of
    5: all really run at once, all ack, and all connections come back."""
    server = server_factory(async_mode, pool_size=5, max_overflow=0, pool_timeout=10)
    clients = [connect_client(server) for _ in range(5)]

    with ThreadPoolExecutor(len(clients)) as pool:
        started = time.monotonic()
        futures = [
            pool.submit(client.call, "hold", 1.0, namespace=NS, timeout=20) for client in clients
        ]
        peak = 0

        def all_five_held() -> bool:
            nonlocal peak
            peak = max(peak, server.stats()["checked_out"])
            return peak == 5 or all(f.done() for f in futures)

        wait_for(all_five_held, 15, "the hold calls to run", interval=0.02)
        results = [future.result(timeout=20) for future in futures]
        elapsed = time.monotonic() - started

    assert results == [True] * 5
    assert peak == 5, f"at most {peak} of 5 hold handlers held a connection at once"
    assert elapsed < 4.5, f"5 concurrent 1 s holds took {elapsed:.1f} s"
    server.wait_checked_out(0)


def test_request_sid_inside_handlers(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    server = server_factory(async_mode)
    first, second = connect_client(server), connect_client(server)

    first_sid = first.call("whoami", namespace=NS, timeout=10)
    second_sid = second.call("whoami", namespace=NS, timeout=10)

    assert first_sid == first.get_sid(NS)
    assert second_sid == second.get_sid(NS)
    assert first_sid != second_sid


@pytest.mark.parametrize(
    "auth", [{"refuse": True}, {"refuse": "builtin"}], ids=["socketio-refused", "builtin"]
)
def test_connect_refused_server_side_is_refused_over_the_wire(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    auth: dict[str, Any],
) -> None:
    """``on_connect`` raising ConnectionRefusedError (Socket.IO's or the built-in one)
    refuses the connection; a normal client still connects."""
    server = server_factory(async_mode)

    with pytest.raises(socketio.exceptions.ConnectionError):
        connect_client(server, auth=auth)

    client = connect_client(server, auth={"token": "fine"})
    assert client.connected
    assert client.call("whoami", namespace=NS, timeout=10) == client.get_sid(NS)
    server.wait_checked_out(0)


def test_pytest_process_is_not_monkey_patched() -> None:
    """eventlet and gevent patching belong in the server processes only."""
    assert "eventlet" not in sys.modules
    if "gevent.monkey" in sys.modules:
        assert not sys.modules["gevent.monkey"].is_anything_patched()
