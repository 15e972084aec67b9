"""Fault tolerance against a real PostgreSQL: a hiccup costs users nothing, an outage
costs them a fast, clear answer, and nothing is ever applied twice.

Every test starts ``tests.servers.app --extra tests.servers.faults`` in a subprocess
(namespace ``/f``, see that module) and talks to it with real python-socketio
clients over WebSocket. Faults are real: backends are killed with
``pg_terminate_backend``, serialization failures come from real concurrent
SERIALIZABLE transactions, and outages come from ``tests/tcp_proxy.py`` sitting
between the server and PostgreSQL. Rows are checked straight in the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
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
    assert_error_ack,
    engine_options,
    new_token,
    proxied,
    servers_stop_first,
)
from tcp_proxy import TcpProxy

pytestmark = [pytest.mark.server, pytest.mark.postgres]

NS = "/f"
EXTRA = ["tests.servers.faults"]
# Must match tests/servers/faults.py (not imported here: the server module may patch).
SECRET = "fault-secret-detail"
#: An outage must be answered well within this (expected: well under a second).
OUTAGE_ACK_BOUND = 15.0
#: Stands for "no ack came" in :func:`call_concurrently` results.
NO_ACK = "<no ack>"

Job = tuple[socketio.Client, str, Sequence[Any]]

FAULTS = ExtraModule(NS, "/f/metrics")
call = FAULTS.call
fault_metrics = FAULTS.state
event_stats = FAULTS.event_stats
runs = FAULTS.runs
retry_lines = FAULTS.retry_lines


# -- helpers ---------------------------------------------------------------------------


def call_concurrently(jobs: Sequence[Job], timeout: float = 60.0) -> list[tuple[Any, float]]:
    """Run every ``(client, event, args)`` at once; ``[(ack, seconds)]`` in job order,
    with :data:`NO_ACK` for a call that got no ack within ``timeout``."""
    barrier = threading.Barrier(len(jobs))

    def run(job: Job) -> tuple[Any, float]:
        client, event, args = job
        barrier.wait(timeout=30)
        started = time.monotonic()
        try:
            ack = call(client, event, *args, timeout=timeout)
        except socketio.exceptions.TimeoutError:
            ack = NO_ACK
        return ack, time.monotonic() - started

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


@pytest.fixture
def connect_client(connect_client: ClientFactory) -> Iterator[ClientFactory]:
    """Clients on ``/f``; the servers stop before the clients disconnect."""
    yield from servers_stop_first(connect_client, NS)


def row_count(engine: sa.Engine, keys: Sequence[str]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM fault_rows WHERE key = ANY(:keys)"),
                {"keys": list(keys)},
            ).scalar_one()
        )


def counter_value(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT value FROM fault_counters WHERE name = :name"), {"name": name}
            ).scalar_one()
        )


def add_counter(engine: sa.Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO fault_counters (name, value) VALUES (:name, 0)"), {"name": name}
        )


def backends(engine: sa.Engine, application_name: str) -> list[int]:
    """PIDs of the PostgreSQL backends of the server's pool (by application_name)."""
    with engine.connect() as conn:
        return [
            int(pid)
            for pid in conn.execute(
                sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": application_name},
            ).scalars()
        ]


def terminate(engine: sa.Engine, pids: Sequence[int]) -> int:
    with engine.connect() as conn:
        return sum(
            bool(conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar())
            for pid in pids
        )


def start_proxied(
    server_factory: ServerFactory,
    async_mode: str,
    pg_proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
    **config: Any,
) -> ServerProcess:
    """A fault server whose database connections all go through ``proxy``."""
    return server_factory(
        async_mode,
        extra=EXTRA,
        config={
            "SQLALCHEMY_DATABASE_URI": proxied(schema_url(postgres_url, pg_schema), pg_proxy),
            # connect_timeout bounds a connect to a server that accepts and never
            # answers; pool_timeout bounds the wait for a pooled connection.
            "SQLALCHEMY_ENGINE_OPTIONS": engine_options(pool_timeout=5.0, connect_timeout=2),
            **config,
        },
    )


# -- a. every pooled backend killed ----------------------------------------------------


def test_killed_backends_cost_users_nothing(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    db_check: sa.Engine,
) -> None:
    """With the pool warm (5 idle connections, no pre-ping), every backend is killed
    with pg_terminate_backend. The next 15 events, 3 per client at once, all succeed:
    those that met a dead connection were retried on a fresh one."""
    app_name = f"faults-{new_token()}"
    server = server_factory(
        async_mode,
        extra=EXTRA,
        config={"SQLALCHEMY_ENGINE_OPTIONS": engine_options(application_name=app_name)},
    )
    clients = [connect_client(server, NS) for _ in range(5)]

    def warm() -> bool:
        with ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(lambda client: call(client, "hold", 0.3), clients))
        return len(backends(db_check, app_name)) == 5

    wait_for(warm, 30, "5 pooled connections open at once", interval=0)
    assert server.wait_checked_out(0)["pool"]["checked_in"] == 5

    pids = backends(db_check, app_name)
    assert terminate(db_check, pids) == 5
    wait_for(lambda: not backends(db_check, app_name), 10, "the killed backends to exit")
    assert server.stats()["pool"]["checked_in"] == 5  # the pool does not know yet

    tokens = [new_token() for _ in range(15)]
    jobs = [(clients[i % len(clients)], "write", (token,)) for i, token in enumerate(tokens)]
    results = call_concurrently(jobs)

    bad = [ack for ack, _ in results if not (isinstance(ack, dict) and "id" in ack)]
    assert not bad, f"{len(bad)} of {len(results)} events failed: {bad[:3]}"
    assert len({ack["id"] for ack, _ in results}) == len(tokens)
    assert row_count(db_check, tokens) == len(tokens)
    stats = event_stats(server, "write")
    assert stats["count"] == len(tokens) and stats["errors"] == 0, stats
    assert stats["retries"] >= 1, stats
    # each retried event ran twice, the others once: no event ran a third time
    counts = sorted(runs(server, "write", token) for token in tokens)
    assert set(counts) <= {1, 2} and counts.count(2) == stats["retries"], counts
    lines = wait_for(lambda: retry_lines(server, "write"), 10, "a WARNING retry line")
    assert (2, 3) in lines, lines
    assert set(backends(db_check, app_name)).isdisjoint(pids)  # fresh backends
    server.wait_checked_out(0)


# -- b. serialization failures ---------------------------------------------------------


def test_concurrent_serializable_increments_are_exact(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    db_check: sa.Engine,
) -> None:
    """5 clients x 8 read-modify-write increments of one row at SERIALIZABLE, all in
    flight at once: conflicts (40001) are retried until each increment lands exactly
    once; the acks are exactly 1..40, as if the increments had run one at a time."""
    server = server_factory(
        async_mode,
        extra=EXTRA,
        config={
            "DBCTX_MAX_RETRIES": 200,
            "DBCTX_RETRY_DELAY": 0.005,
            "DBCTX_RETRY_MAX_DELAY": 0.05,
        },
    )
    add_counter(db_check, "hits")
    clients = [connect_client(server, NS) for _ in range(5)]
    jobs = [(client, "increment", ("hits", 0.01)) for client in clients for _ in range(8)]

    results = call_concurrently(jobs, timeout=120)

    acks = [ack for ack, _ in results]
    assert sorted(acks) == list(range(1, len(jobs) + 1)), acks
    assert counter_value(db_check, "hits") == len(jobs)
    stats = event_stats(server, "increment")
    assert stats["count"] == len(jobs) and stats["errors"] == 0, stats
    assert stats["retries"] > 0, stats
    server.wait_checked_out(0)


# -- c. the database goes away, then comes back ----------------------------------------


@pytest.mark.parametrize("how", ["cut", "blackhole"])
def test_outage_answers_fast_and_recovers(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    pg_proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
    db_check: sa.Engine,
    how: str,
) -> None:
    """The database goes away: ``cut`` closes every connection and refuses new ones
    (the server is down); ``blackhole`` closes them and then accepts new ones but never
    answers (a hung server, a firewall dropping replies), so only the driver's
    ``connect_timeout`` (2 s here) ends a connect. Either way every call is acked
    ``db_unavailable`` with ``retryable: true`` after its retries, in bounded time and
    with nothing stored; ``@no_retry`` gives up after one run with ``retryable: false``.
    When the proxy is back the same process serves again."""
    server = start_proxied(server_factory, async_mode, pg_proxy, postgres_url, pg_schema)
    clients = [connect_client(server, NS) for _ in range(2)]
    assert "id" in call(clients[0], "write", new_token())  # the pool is warm
    pid = server.proc.pid

    if how == "cut":
        pg_proxy.cut()
    else:
        pg_proxy.blackhole()
    # 4 at once: within the pool (5), so no call waits for a connection slot
    tokens = [new_token() for _ in range(4)]
    jobs = [(clients[i % len(clients)], "write", (token,)) for i, token in enumerate(tokens)]
    results = call_concurrently(jobs, timeout=OUTAGE_ACK_BOUND + 5)

    slowest = max(seconds for _, seconds in results)
    assert slowest < OUTAGE_ACK_BOUND, (
        f"an outage ({how}) ack took {slowest:.1f}s; acks: {[ack for ack, _ in results]}"
    )
    for ack, _ in results:
        assert_error_ack(ack, "db_unavailable", retryable=True)
    stats = event_stats(server, "write")
    assert stats["retries"] == 2 * len(tokens), stats  # DBCTX_MAX_RETRIES=2 each
    assert [runs(server, "write", token) for token in tokens] == [3] * len(tokens)
    assert (3, 3) in retry_lines(server, "write")

    token = new_token()
    ack = call(clients[0], "kill_self_no_retry", token, 0, timeout=OUTAGE_ACK_BOUND)
    assert_error_ack(ack, "db_unavailable", retryable=False)
    assert runs(server, "kill_self_no_retry", token) == 1
    assert event_stats(server, "kill_self_no_retry")["retries"] == 0
    server.wait_checked_out(0)
    assert row_count(db_check, [*tokens, token]) == 0

    pg_proxy.restore()
    after = [new_token() for _ in clients]
    acks = [call(client, "write", token) for client, token in zip(clients, after)]
    assert all(isinstance(ack, dict) and "id" in ack for ack in acks), acks
    assert row_count(db_check, after) == len(after)
    assert server.alive() and server.proc.pid == pid
    server.wait_checked_out(0)


# -- d. errors that are not transient --------------------------------------------------


@pytest.mark.parametrize(
    ("event", "code", "stored"),
    [
        ("insert_unique", "internal_error", 1),  # 23505 unique_violation, at the flush
        ("sql_error", "internal_error", 0),  # 22012 division_by_zero
        ("buggy", "internal_error", 0),  # a bug in the handler
        ("invalid", "invalid_request", 0),  # the handler rejects the request
    ],
)
def test_non_transient_errors_are_not_retried(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    db_check: sa.Engine,
    event: str,
    code: str,
    stored: int,
) -> None:
    """A failure that would fail again is answered at once: one run, no retry, a safe
    ack, everything the failed run wrote rolled back."""
    server = server_factory(async_mode, extra=EXTRA)
    client = connect_client(server, NS)
    token = new_token()
    if event == "insert_unique":
        assert call(client, event, token) == {"ok": 1}
    runs_before = runs(server, event, token)

    ack = call(client, event, token)

    assert_error_ack(ack, code, retryable=False)
    assert runs(server, event, token) == runs_before + 1
    stats = event_stats(server, event)
    assert stats["retries"] == 0 and stats["errors"] == 1, stats
    assert retry_lines(server, event) == []
    assert row_count(db_check, [token]) == stored
    server.wait_checked_out(0)
    if event == "buggy":  # the traceback went to the log instead of the client
        wait_for(lambda: SECRET in server.log(), 10, "the handler's exception in the log")


# -- e. per-handler retry options ------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "ack_ok", "expected_runs"),
    [("kill_self", True, 2), ("kill_self_no_retry", False, 1)],
    ids=["plain-retried", "no_retry"],
)
def test_connection_lost_in_handler(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    db_check: sa.Engine,
    event: str,
    ack_ok: bool,
    expected_runs: int,
) -> None:
    """The handler's backend is terminated under it (before anything is stored): a
    plain handler runs again and succeeds; a ``@no_retry`` one runs once and acks
    ``db_unavailable`` with ``retryable: false``."""
    server = server_factory(async_mode, extra=EXTRA)
    client = connect_client(server, NS)
    token = new_token()

    ack = call(client, event, token, 1)

    if ack_ok:
        assert isinstance(ack, dict) and ack.get("run") == 2, ack
        assert (2, 3) in retry_lines(server, event)
    else:
        assert_error_ack(ack, "db_unavailable", retryable=False)
        assert retry_lines(server, event) == []
    assert runs(server, event, token) == expected_runs
    assert event_stats(server, event)["retries"] == expected_runs - 1
    assert row_count(db_check, [token]) == (1 if ack_ok else 0)
    server.wait_checked_out(0)


@pytest.mark.parametrize(
    "event",
    ["add_one", "put"],
    ids=["plain-resolved-committed", "idempotent-resolved-committed"],
)
def test_connection_lost_during_commit(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    pg_proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
    db_check: sa.Engine,
    event: str,
) -> None:
    """The COMMIT reaches PostgreSQL and is applied, but its reply never comes back:
    the proxy closes the connection instead. The library asks ``txid_status()`` on a
    fresh connection, learns that the COMMIT went through, and acks the first run's
    own result: a plain handler does not run again (its increment would be applied
    twice), and neither does an ``@idempotent`` one (no need: it is done)."""
    server = start_proxied(server_factory, async_mode, pg_proxy, postgres_url, pg_schema)
    client = connect_client(server, NS)
    add_counter(db_check, "clicks")
    token = new_token()
    args: tuple[Any, ...] = ("clicks", token) if event == "add_one" else (token, "v1", token)

    pg_proxy.cut_next_commit()
    ack = call(client, event, *args)

    assert pg_proxy.commits_cut == 1
    # the first run's own result: the increment it committed / the row was new
    assert ack == (1 if event == "add_one" else {"existed": False}), ack
    assert runs(server, event, token) == 1
    stats = event_stats(server, event)
    assert stats["retries"] == 0 and stats["errors"] == 0, stats
    assert counter_value(db_check, "clicks") == (1 if event == "add_one" else 0)
    with db_check.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT value FROM fault_kv WHERE key = :key"), {"key": token}
        ).scalars()
        assert list(stored) == ([] if event == "add_one" else ["v1"])
    server.wait_checked_out(0)


# -- the bad inputs of the fault handlers ----------------------------------------------


def test_fault_handlers_reject_bad_input(
    server_factory: ServerFactory, connect_client: ClientFactory, db_check: sa.Engine
) -> None:
    """Each bad argument is answered ``invalid_request`` at once: not retried, nothing
    stored, no connection kept."""
    server = server_factory("threading", extra=EXTRA)
    client = connect_client(server, NS)
    add_counter(db_check, "n")
    bad: list[tuple[str, tuple[Any, ...]]] = [
        ("write", ()),  # missing argument (the library's arity check)
        ("write", ("a", "b")),  # one too many
        ("write", (7,)),
        ("write", ("",)),
        ("write", ("x" * 101,)),
        ("hold", (-1,)),
        ("hold", (True,)),
        ("hold", (11,)),
        ("increment", ("n", "slow")),
        ("increment", (None,)),
        ("kill_self", ("k1", -1)),
        ("kill_self", ("k2", 1.5)),
        ("put", ("k3", 5, "k3")),
        ("add_one", ({"name": "n"}, "k4")),
    ]
    for event, args in bad:
        ack = call(client, event, *args)
        assert isinstance(ack, dict) and ack.get("error") == "invalid_request", (event, args, ack)
        assert ack["retryable"] is False, (event, args, ack)
    events = fault_metrics(server)["events"]
    assert all(stats["retries"] == 0 for stats in events.values()), events
    assert retry_lines(server, "kill_self") == []
    assert row_count(db_check, ["a", "k1", "k2", "k3", "k4"]) == 0
    assert counter_value(db_check, "n") == 0
    with db_check.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM fault_kv")).scalar_one() == 0
    server.wait_checked_out(0)


# -- the proxy itself ------------------------------------------------------------------


def proxy_dsn(pg_proxy: TcpProxy, postgres_url: str, **extra: Any) -> dict[str, Any]:
    url = sa.engine.make_url(postgres_url)
    return {
        "host": "127.0.0.1",
        "port": pg_proxy.port,
        "user": url.username,
        "dbname": url.database,
        "sslmode": "disable",
        "connect_timeout": 2,
        **extra,
    }


def test_proxy_forwards_cuts_and_restores(pg_proxy: TcpProxy, postgres_url: str) -> None:
    import psycopg2

    conn = psycopg2.connect(**proxy_dsn(pg_proxy, postgres_url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 41 + 1")
            assert cur.fetchone() == (42,)
        assert pg_proxy.active == 1 and pg_proxy.state == "forwarding"
        port = pg_proxy.port

        pg_proxy.cut()

        assert pg_proxy.state == "refusing"
        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
        with pytest.raises(psycopg2.OperationalError, match="refused"):
            psycopg2.connect(**proxy_dsn(pg_proxy, postgres_url))
        pg_proxy.cut()  # idempotent

        pg_proxy.restore()

        assert pg_proxy.port == port and pg_proxy.state == "forwarding"
        again = psycopg2.connect(**proxy_dsn(pg_proxy, postgres_url))
        with again.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
        again.close()
    finally:
        conn.close()
    wait_for(lambda: pg_proxy.active == 0, 5, "the proxy to see both connections closed")


def test_proxy_blackhole_hangs_connects_until_restored(
    pg_proxy: TcpProxy, postgres_url: str
) -> None:
    import psycopg2

    pg_proxy.blackhole()

    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="timeout expired"):
        psycopg2.connect(**proxy_dsn(pg_proxy, postgres_url))
    assert time.monotonic() - started >= 1.5  # libpq gave up, the proxy did not answer
    assert pg_proxy.accepted >= 1

    pg_proxy.restore()
    conn = psycopg2.connect(**proxy_dsn(pg_proxy, postgres_url))
    with conn.cursor() as cur:
        cur.execute("SELECT 3")
        assert cur.fetchone() == (3,)
    conn.close()


def test_proxy_cut_next_commit_applies_it_and_drops_the_reply(
    pg_proxy: TcpProxy, postgres_url: str, db_check: sa.Engine
) -> None:
    import psycopg2

    with db_check.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t_commit (v int)"))
    dsn = proxy_dsn(pg_proxy, postgres_url, options=db_check.url.query["options"])
    conn = psycopg2.connect(**dsn)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t_commit VALUES (1)")

    pg_proxy.cut_next_commit()
    with pytest.raises(psycopg2.OperationalError, match="closed the connection"):
        conn.commit()

    assert pg_proxy.commits_cut == 1
    with db_check.connect() as check:
        assert check.execute(sa.text("SELECT v FROM t_commit")).scalars().all() == [1]
    # armed once: the next COMMIT goes through
    other = psycopg2.connect(**dsn)
    with other.cursor() as cur:
        cur.execute("INSERT INTO t_commit VALUES (2)")
    other.commit()
    other.close()
    assert pg_proxy.commits_cut == 1
    with db_check.connect() as check:
        assert sorted(check.execute(sa.text("SELECT v FROM t_commit")).scalars()) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_port": 0}, "target_port must be 1-65535"),
        ({"target_port": 65536}, "target_port must be 1-65535"),
        ({"target_port": "5432"}, "target_port must be an int"),
        ({"target_port": True}, "target_port must be an int"),
        ({"port": -1}, "port must be 0-65535"),
        ({"port": 1.5}, "port must be 0-65535"),
    ],
)
def test_proxy_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    args = {"target_host": "127.0.0.1", "target_port": 5432, **kwargs}
    with pytest.raises(ValueError, match=message):
        TcpProxy(**args)


@pytest.mark.parametrize("count", [0, -1, True, "1", 1.0])
def test_proxy_rejects_a_bad_commit_cut_count(count: Any) -> None:
    with TcpProxy("127.0.0.1", 5432) as running:
        with pytest.raises(ValueError, match="count must be an int >= 1"):
            running.cut_next_commit(count)
        assert running.commits_cut == 0


@pytest.mark.parametrize("method", ["cut", "blackhole", "restore", "cut_next_commit"])
def test_proxy_needs_start(method: str) -> None:
    proxy = TcpProxy("127.0.0.1", 5432)
    with pytest.raises(RuntimeError, match="not running"):
        getattr(proxy, method)()
    with pytest.raises(RuntimeError, match="no port yet"):
        _ = proxy.port


def test_proxy_cannot_start_twice() -> None:
    running = TcpProxy("127.0.0.1", 5432)
    with running, pytest.raises(RuntimeError, match="already started"):
        running.start()
    assert running.state == "stopped"
