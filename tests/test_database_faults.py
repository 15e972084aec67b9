"""Real MariaDB and SQLite failures on real servers: each is retried, each event is
applied once, and the pool is whole afterwards.

Every test starts ``tests.servers.app --extra tests.servers.db_faults`` (namespace
``/d``, see that module) on its own MariaDB database or SQLite file and talks to it
with real python-socketio clients over WebSocket. The faults are the servers' own:
``KILL`` from another connection (PyMySQL ``2013``), ``KILL CONNECTION_ID()``
(``1927``), a real deadlock between two events (``1213``), a real lock wait timeout
(``1205``), a real ``database is locked``. The test steers the handlers with locks it
holds (MariaDB named locks and row locks, a SQLite write lock) and watches them in
``information_schema.PROCESSLIST`` or the server's run counts: no sleeps. The same
failures as unit decisions: ``tests/test_transient_unit.py``.
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ON_MARIADB, ON_SQLITE, POOL_KEYS, ServerProcess, wait_for
from eventkit import ClientFactory, ExtraModule, ServerFactory, direct_connection, new_token

pytestmark = pytest.mark.server

NS = "/d"
EXTRA = ["tests.servers.db_faults"]
#: Retries come fast here; the decisions, not the backoff, are under test.
CONFIG = {"DBCTX_RETRY_DELAY": 0.01, "DBCTX_RETRY_MAX_DELAY": 0.05}
#: Seconds any one ack may take (a gate a test forgot would hold a handler 30 s).
ACK_TIMEOUT = 40


DB_FAULTS = ExtraModule(NS, "/d/metrics", timeout=ACK_TIMEOUT)
call = DB_FAULTS.call
runs = DB_FAULTS.runs
event_stats = DB_FAULTS.event_stats


# -- helpers ---------------------------------------------------------------------------


def start(server_factory: ServerFactory, async_mode: str, **config: Any) -> ServerProcess:
    return server_factory(async_mode, extra=EXTRA, config={**CONFIG, **config})


def admin_connection(server: ServerProcess) -> AbstractContextManager[sa.Connection]:
    """The test's own connection to the server's database, in autocommit mode (named
    locks and ``KILL`` need no transaction; row locks open one explicitly)."""
    return direct_connection(server, autocommit=True)


def stored_tokens(server: ServerProcess) -> list[str]:
    with admin_connection(server) as conn:
        return sorted(conn.exec_driver_sql("SELECT token FROM d_rows").scalars())


def take_gate(conn: sa.Connection, gate: str) -> None:
    assert conn.exec_driver_sql("SELECT GET_LOCK(%s, 0)", (gate,)).scalar() == 1


def open_gate(conn: sa.Connection, gate: str) -> None:
    assert conn.exec_driver_sql("SELECT RELEASE_LOCK(%s)", (gate,)).scalar() == 1


def waiting_at(conn: sa.Connection, gate: str) -> list[int]:
    """Ids of the connections waiting for the named lock ``gate`` right now."""
    return list(
        conn.exec_driver_sql(
            "SELECT ID FROM information_schema.PROCESSLIST "
            "WHERE INFO LIKE %s AND ID <> CONNECTION_ID() ORDER BY ID",
            (f"%GET_LOCK('{gate}'%",),
        ).scalars()
    )


def assert_pool_whole(server: ServerProcess) -> None:
    """Nothing checked out, and the pool dict has its documented shape."""
    stats = server.wait_checked_out(0)
    pool = stats["pool"]
    assert set(pool) == POOL_KEYS, pool
    assert pool["checked_out"] == 0 and pool["status"] == "healthy", pool
    assert pool["pool_class"] == "QueuePool" and pool["capacity"] == 5, pool


def retried_after(server: ServerProcess, error: str) -> bool:
    """The server logged a retry after ``error`` (e.g. ``(2013,``)."""
    return any("retrying" in line and error in line for line in server.log().splitlines())


# -- MariaDB: PyMySQL is green -------------------------------------------------------


@ON_MARIADB
def test_pymysql_waits_do_not_block_the_async_mode(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """5 events each wait 1 s inside the database (``SELECT SLEEP(1)``) at once on a
    pool of 5: under eventlet and gevent too they overlap (PyMySQL's sockets are
    green), so all five are done in well under the 5 s one after another would take,
    and no WARNING about the driver is logged."""
    server = start(server_factory, async_mode)
    clients = [connect_client(server, NS) for _ in range(5)]
    with ThreadPoolExecutor(len(clients)) as pool:
        started = time.monotonic()
        acks = list(pool.map(lambda client: call(client, "db_sleep", 1.0), clients))
        elapsed = time.monotonic() - started
    assert acks == [True] * 5
    assert elapsed < 3.5, f"5 concurrent 1 s database waits took {elapsed:.1f} s"
    assert "socketio_dbctx.drivers" not in server.log()
    assert_pool_whole(server)


# -- MariaDB: connections killed -------------------------------------------------------


@ON_MARIADB
def test_a_connection_killed_mid_statement_is_retried_and_stored_once(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """The handler inserts its row and waits for a gate the test holds; the test
    ``KILL``s its connection (PyMySQL: ``2013 Lost connection``). The event runs again
    on a fresh connection, its ack is a success, its row is there once, and the pool
    serves the next event."""
    server = start(server_factory, async_mode)
    client = connect_client(server, NS)
    token, gate = new_token(), f"gate-{new_token()}"
    with admin_connection(server) as admin, ThreadPoolExecutor(1) as pool:
        take_gate(admin, gate)
        pending = pool.submit(call, client, "gated_write", token, gate)
        killed = wait_for(lambda: waiting_at(admin, gate), 20, "the handler at the gate")
        assert len(killed) == 1
        admin.exec_driver_sql(f"KILL {killed[0]}")
        # the retry waits at the gate too, on another connection
        wait_for(
            lambda: [cid for cid in waiting_at(admin, gate) if cid not in killed],
            20,
            "the retry at the gate",
        )
        open_gate(admin, gate)
        ack = pending.result(ACK_TIMEOUT)
    assert ack["run"] == 2 and ack["connection_id"] != killed[0], ack
    assert stored_tokens(server) == [token]
    stats = event_stats(server, "gated_write")
    assert stats["retries"] == 1 and stats["errors"] == 0, stats
    assert retried_after(server, "(2013,"), server.log()[-3000:]
    # the pool is usable after: the next event goes straight through
    after = call(client, "gated_write", new_token(), f"free-{new_token()}")
    assert after["run"] == 1, after
    assert_pool_whole(server)


@ON_MARIADB
def test_a_connection_the_server_kills_is_retried(
    server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """``KILL CONNECTION_ID()``: the server kills the handler's own connection and says
    so (``1927 Connection was killed``, SQLSTATE ``70100``) before the COMMIT."""
    server = start(server_factory, "threading")
    client = connect_client(server, NS)
    token = new_token()
    ack = call(client, "kill_self", token, 2)
    assert ack["run"] == 3, ack
    assert stored_tokens(server) == [token]
    stats = event_stats(server, "kill_self")
    assert stats["retries"] == 2 and stats["errors"] == 0, stats
    assert retried_after(server, "(1927,"), server.log()[-3000:]
    assert_pool_whole(server)


# -- MariaDB: locks --------------------------------------------------------------------


def add_counters(server: ServerProcess, *names: str) -> None:
    with admin_connection(server) as conn:
        for name in names:
            conn.exec_driver_sql("INSERT INTO d_counters (name, value) VALUES (%s, 0)", (name,))


def counter_values(server: ServerProcess) -> dict[str, int]:
    with admin_connection(server) as conn:
        rows = conn.exec_driver_sql("SELECT name, value FROM d_counters").all()
    return {name: int(value) for name, value in rows}


@ON_MARIADB
def test_a_real_deadlock_retries_the_victim_and_applies_both_once(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """Two events update rows ``a`` and ``b`` in opposite orders. Each takes its first
    row, then both wait at one gate; the test opens it once both are there, and InnoDB
    finds the deadlock (``1213``) and rolls one back. The victim runs again: both
    events succeed, each counter goes up by exactly 2, each row is stored once."""
    server = start(server_factory, async_mode)
    add_counters(server, "a", "b")
    clients = [connect_client(server, NS) for _ in range(2)]
    tokens, gate = [new_token(), new_token()], f"gate-{new_token()}"
    with admin_connection(server) as admin, ThreadPoolExecutor(2) as pool:
        take_gate(admin, gate)
        pending = [
            pool.submit(call, clients[0], "cross_update", tokens[0], "a", "b", gate),
            pool.submit(call, clients[1], "cross_update", tokens[1], "b", "a", gate),
        ]
        wait_for(lambda: len(waiting_at(admin, gate)) == 2, 20, "both events at the gate")
        open_gate(admin, gate)
        acks = [future.result(ACK_TIMEOUT) for future in pending]
    assert sorted(acks) == [1, 2], acks  # the runs of each: one victim ran twice
    assert counter_values(server) == {"a": 2, "b": 2}
    assert stored_tokens(server) == sorted(tokens)
    stats = event_stats(server, "cross_update")
    assert stats["retries"] == 1 and stats["errors"] == 0 and stats["count"] == 2, stats
    assert retried_after(server, "(1213,"), server.log()[-3000:]
    assert_pool_whole(server)


@ON_MARIADB
def test_a_lock_wait_timeout_is_retried(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """The test holds row ``hot`` (``SELECT ... FOR UPDATE``); the handler's first run
    waits 1 s for it (``innodb_lock_wait_timeout``) and fails with ``1205``. Once its
    retry has started the test lets the row go: the retry gets it, the ack is a
    success, the counter went up once."""
    server = start(server_factory, async_mode)
    add_counters(server, "hot")
    client = connect_client(server, NS)
    token = new_token()
    with admin_connection(server) as admin, ThreadPoolExecutor(1) as pool:
        admin.exec_driver_sql("START TRANSACTION")
        admin.exec_driver_sql("SELECT value FROM d_counters WHERE name = 'hot' FOR UPDATE")
        pending = pool.submit(call, client, "locked_update", token, "hot")
        wait_for(lambda: runs(server, "locked_update", token) == 2, 20, "the retry to start")
        admin.exec_driver_sql("COMMIT")
        ack = pending.result(ACK_TIMEOUT)
    assert ack == 2, ack
    assert counter_values(server) == {"hot": 1}
    assert stored_tokens(server) == [token]
    stats = event_stats(server, "locked_update")
    assert stats["retries"] == 1 and stats["errors"] == 0, stats
    assert retried_after(server, "(1205,"), server.log()[-3000:]
    assert_pool_whole(server)


# -- SQLite: database is locked --------------------------------------------------------


@ON_SQLITE
def test_sqlite_database_is_locked_is_retried_until_the_other_writer_commits(
    server_factory: ServerFactory, connect_client: ClientFactory, tmp_path: Path
) -> None:
    """Two writers on one SQLite file: the test writes first (``BEGIN IMMEDIATE``) and
    holds the write lock; the server's engine waits 0.05 s for a lock. The event's
    INSERT fails with ``database is locked`` and is retried; once the retry has
    started (and waits up to 30 s) the test commits, and the retry succeeds. Both rows
    are stored once."""
    path = tmp_path / "server.db"  # server_factory's SQLite file
    # the engine's busy timeout (pysqlite's connect argument "timeout", in the URL)
    server = start(
        server_factory, "threading", SQLALCHEMY_DATABASE_URI=f"sqlite:///{path}?timeout=0.05"
    )
    assert server.database_url == f"sqlite:///{path}"
    client = connect_client(server, NS)
    token = new_token()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO d_rows (token) VALUES ('first-writer')")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call, client, "sqlite_write", token)
            wait_for(lambda: runs(server, "sqlite_write", token) == 2, 20, "the retry to start")
            writer.execute("COMMIT")
            ack = pending.result(ACK_TIMEOUT)
    finally:
        writer.close()
    assert ack["run"] == 2, ack
    with sqlite3.connect(path) as conn:
        tokens = sorted(row[0] for row in conn.execute("SELECT token FROM d_rows"))
    assert tokens == sorted(["first-writer", token])
    stats = event_stats(server, "sqlite_write")
    assert stats["retries"] == 1 and stats["errors"] == 0, stats
    assert retried_after(server, "database is locked"), server.log()[-3000:]
    assert_pool_whole(server)
