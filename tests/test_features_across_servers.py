"""The new features together with the rest, on real servers: a drain while the
database hangs is bounded by the statement watchdog, and one idempotency key sent to
two workers at once (different async modes, one Redis message queue) is applied, acked
and broadcast once.

Real PostgreSQL (through ``tests/tcp_proxy.py`` where it must stop answering), real
server processes (``tests.servers.app --extra tests.servers.across``, namespace
``/x``, and ``tests.servers.ops`` for the drain), real python-socketio clients. The
tests wait on what the servers and PostgreSQL report (``/_stats``,
``pg_stat_activity``), never on sleeps. The same features' semantics, through every
way a handler is registered: ``tests/test_features_across.py``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import socketio
import sqlalchemy as sa
from conftest import ServerProcess, schema_url, wait_for
from eventkit import (
    ClientFactory,
    ExtraModule,
    ServerFactory,
    engine_options,
    new_token,
    proxied,
    servers_stop_first,
)
from tcp_proxy import TcpProxy

pytestmark = [pytest.mark.server, pytest.mark.postgres]

NS = "/x"
EXTRA = ["tests.servers.across"]
#: The statement timeout of these servers, seconds.
STATEMENT_TIMEOUT = 1.0
#: The contract: every event on a hung database is acked within this.
HUNG_BOUND = STATEMENT_TIMEOUT + 5.0

ACROSS = ExtraModule(NS, "/x/calls")
call = ACROSS.call
runs = ACROSS.runs


def ops_state(server: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(server.get("/_ops/state"))
    return data


def assert_error(ack: Any, code: str, retryable: bool) -> None:
    assert isinstance(ack, dict), ack
    assert ack.get("error") == code and ack.get("retryable") is retryable, ack
    assert isinstance(ack.get("message"), str) and ack["message"], ack


@pytest.fixture
def connect_client(connect_client: ClientFactory) -> Iterator[ClientFactory]:
    """Clients on ``/x``; the servers stop before the clients disconnect."""
    yield from servers_stop_first(connect_client, NS)


def backends(engine: sa.Engine, application_name: str, where: str = "TRUE") -> int:
    """How many PostgreSQL backends of ``application_name`` there are (matching
    ``where``, a condition on ``pg_stat_activity``)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    f"WHERE application_name = :name AND ({where})"
                ),
                {"name": application_name},
            ).scalar_one()
        )


def stored(engine: sa.Engine, tokens: list[str]) -> list[str]:
    with engine.connect() as conn:
        return sorted(
            conn.execute(
                sa.text("SELECT token FROM x_rows WHERE token = ANY(:tokens)"),
                {"tokens": tokens},
            ).scalars()
        )


# -- drain while the database hangs ------------------------------------------------------


@pytest.mark.parametrize("async_mode", ["threading", "eventlet", "gevent"])
def test_a_drain_on_a_hung_database_ends_within_the_watchdog_bound(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    pg_proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
    db_check: sa.Engine,
) -> None:
    """Three events are in a statement when the network partitions (every connection
    stays open, nothing is answered), and the server is told to drain. A drain waits
    for the events in flight; they would wait forever, but the statement watchdog
    (``statement_timeout + 1.5 s``) cuts each one: every event is acked ``timeout``
    within ``statement_timeout + 5 s``, ran once, stored nothing; the drain ends True;
    an event sent meanwhile is refused ``busy`` at once; and the server closed the
    three connections itself (their PostgreSQL backends exit while the partition
    still holds every socket open), so none goes back to the pool."""
    app_name = f"across-{new_token()}"
    server = server_factory(
        async_mode,
        pool_size=3,
        extra=[*EXTRA, "tests.servers.ops"],
        config={
            "SQLALCHEMY_DATABASE_URI": proxied(schema_url(postgres_url, pg_schema), pg_proxy),
            "SQLALCHEMY_ENGINE_OPTIONS": engine_options(
                pool_size=3, application_name=app_name, connect_timeout=2
            ),
            "DBCTX_STATEMENT_TIMEOUT": STATEMENT_TIMEOUT,
            "DBCTX_MAX_RETRIES": 2,
        },
    )
    clients = [connect_client(server, NS) for _ in range(4)]
    # three connections open and idle in the pool
    with ThreadPoolExecutor(3) as pool:
        pids = list(pool.map(lambda client: call(client, "hold", 0.5), clients[:3]))
    assert len(set(pids)) == 3, pids
    server.wait_checked_out(0)
    assert backends(db_check, app_name) == 3

    pg_proxy.partition()
    tokens = [new_token() for _ in range(3)]
    results: list[tuple[Any, float]] = [(None, 0.0)] * 3
    barrier = threading.Barrier(3)

    def send(index: int) -> None:
        barrier.wait(10)
        started = time.monotonic()
        try:
            ack = call(clients[index], "query", tokens[index], timeout=HUNG_BOUND + 10)
        except socketio.exceptions.TimeoutError:
            ack = "<no ack>"
        results[index] = (ack, time.monotonic() - started)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(send, index) for index in range(3)]
        wait_for(
            lambda: server.stats()["checked_out"] == 3, 10, "three events in a hung statement"
        )
        drain_started = time.monotonic()
        server.get("/_ops/drain?timeout=30")
        wait_for(lambda: ops_state(server)["draining"], 5, "the drain to start")
        refused_at = time.monotonic()
        refused = call(clients[3], "query", new_token(), timeout=5)
        refused_in = time.monotonic() - refused_at
        for future in futures:
            future.result(HUNG_BOUND + 15)
    drained = wait_for(
        lambda: ops_state(server)["drained"] is not None, HUNG_BOUND, "the drain to return"
    )
    drain_seconds = time.monotonic() - drain_started

    assert drained and ops_state(server)["drained"] is True
    for ack, seconds in results:
        assert_error(ack, "timeout", retryable=False)
        assert seconds < HUNG_BOUND, f"acked after {seconds:.1f}s: {results}"
    assert drain_seconds < HUNG_BOUND + 1, drain_seconds
    assert_error(refused, "busy", retryable=True)
    assert isinstance(refused.get("retry_after_ms"), int) and refused["retry_after_ms"] > 0
    assert refused_in < 2.0, refused_in
    assert [runs(server, "query", token) for token in tokens] == [1, 1, 1]
    server.wait_checked_out(0)
    # the partition still holds: only the server can have closed these connections
    assert pg_proxy.state == "partition"
    wait_for(
        lambda: backends(db_check, app_name) == 0, 10, "the cut connections' backends to exit"
    )
    pg_proxy.restore()
    assert stored(db_check, tokens) == []
    # each cut is logged once, by the event's own thread or greenlet: the watchdog's
    # OS thread taking a (green) logging lock once wedged an eventlet server for good
    log = server.log()
    assert log.count("cut a database connection that gave no answer") == 3, log[-6000:]
    assert "Traceback" not in log, log[-6000:]


# -- one key, two workers, one broadcast -------------------------------------------------


def test_one_key_on_two_workers_at_once_is_applied_acked_and_broadcast_once(
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    db_check: sa.Engine,
    postgres_url: str,
    redis_url: str,
) -> None:
    """An eventlet worker and a gevent worker share the tables and a Redis message
    queue. Client A sends a keyed ``place`` to the first worker, whose run holds at a
    gate (an advisory lock the test holds); client B sends the same key, with another
    payload, to the second worker, which waits for the first run's key. Then the gate
    opens: both get the first run's ack; one row; the handler ran once in all; and a
    watcher on the second worker got the ``placed`` broadcast exactly once (checked
    against a marker each worker broadcasts afterwards)."""
    app_name = f"across-{new_token()}"
    config = {"SQLALCHEMY_ENGINE_OPTIONS": engine_options(application_name=app_name)}
    first = server_factory("eventlet", extra=EXTRA, config=config, message_queue=redis_url)
    second = server_factory(
        "gevent", extra=EXTRA, config=config, message_queue=redis_url, share_schema_with=first
    )
    client_a = connect_client(first, NS)
    client_b = connect_client(second, NS)
    watcher = connect_client(second, NS)
    seen: list[list[Any]] = []
    seen_lock = threading.Lock()

    @watcher.on("placed", namespace=NS)  # type: ignore[misc]
    def placed(data: list[Any]) -> None:
        with seen_lock:
            seen.append(data)

    key, token_a, token_b = new_token(), new_token(), new_token()
    gate = int(uuid.uuid4().int % 2**31)
    with db_check.connect() as holder, ThreadPoolExecutor(2) as pool:
        holder.execute(sa.text("SELECT pg_advisory_lock(:gate)"), {"gate": gate})
        pending_a = pool.submit(
            call, client_a, "place", {"id": key, "token": token_a, "gate": gate}
        )
        wait_for(
            lambda: backends(db_check, app_name, "wait_event = 'advisory'") == 1,
            20,
            "the first run at the gate",
        )
        pending_b = pool.submit(call, client_b, "place", {"id": key, "token": token_b})
        wait_for(
            lambda: backends(db_check, app_name, "wait_event_type = 'Lock'") == 2,
            20,
            "the second worker waiting for the first run's key",
        )
        holder.execute(sa.text("SELECT pg_advisory_unlock(:gate)"), {"gate": gate})
        ack_a, ack_b = pending_a.result(30), pending_b.result(30)
        holder.commit()

    assert ack_a == {"row": ack_a["row"], "token": token_a, "port": first.port}, ack_a
    assert ack_b == ack_a
    assert stored(db_check, [token_a, token_b]) == [token_a]
    assert runs(first, "place", token_a) == 1
    assert runs(second, "place", token_b) == 0

    # a marker from each worker, sent after the acks: once both are in, anything the
    # key's two runs broadcast has arrived too
    markers = [new_token(), new_token()]
    assert call(client_a, "place", {"id": markers[0], "token": markers[0]})["port"] == first.port
    assert call(client_b, "place", {"id": markers[1], "token": markers[1]})["port"] == second.port

    def markers_in() -> bool:
        with seen_lock:
            return {data[0] for data in seen} >= set(markers)

    wait_for(markers_in, 10, "both markers at the watcher")
    with seen_lock:
        about_key = [data for data in seen if data[0] in (token_a, token_b)]
    assert about_key == [[token_a, first.port]], seen
    first.wait_checked_out(0)
    second.wait_checked_out(0)
