"""Statement timeouts and hung databases, on real servers (issue 13 item 3).

Every server test starts ``tests.servers.app --extra tests.servers.timeouts``
(namespaces ``/tmo`` and ``/tmo_attr``, see that module) in a subprocess and talks to
it with real python-socketio clients over WebSocket:

* PostgreSQL, each async mode: a statement longer than ``DBCTX_STATEMENT_TIMEOUT`` is
  cut by the database (ack ``timeout``, ``retryable: false``, one run, nothing
  stored, nothing checked out); a shorter one succeeds; time spent between
  statements is not bounded.
* Precedence read back from the database inside the handler (PostgreSQL
  ``SHOW statement_timeout``, MariaDB ``@@max_statement_time``): decorator >
  namespace attribute > app config, ``@statement_timeout(None)`` turns it off, and a
  plain pooled connection outside any event is back to the default.
* MariaDB ``SLEEP(5)`` and a slow SQLite query under a 1 s timeout, each async mode.
* A hung database (PostgreSQL behind ``tests/tcp_proxy.py``, each async mode): events
  whose statement or COMMIT goes into a network partition are acked within
  ``statement_timeout + 5 s``, the cut connections are discarded, and once the network
  is back the next events succeed on their first attempt; an unanswered COMMIT too is
  acked within that bound (its resolution's connect attempts fit the budget).
* Bad ``DBCTX_STATEMENT_TIMEOUT`` and decorator values fail at set-up.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest
import socketio
import sqlalchemy as sa
from conftest import ServerProcess, schema_url, wait_for
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from tcp_proxy import TcpProxy

import socketio_dbctx
from socketio_dbctx import ContextSetupError, DBContext

NS = "/tmo"
ATTR_NS = "/tmo_attr"
FUNCTION_NS = "/tmo_fn"
EXTRA = ["tests.servers.timeouts"]
# Must match tests/servers/timeouts.py (not imported here: the server module may patch).
ATTR_TIMEOUT = 3
DECORATED_TIMEOUT = 7
BODY_TIMEOUT = 5

#: The statement timeout of every server here, in seconds.
TIMEOUT = 1
#: The contract's bound on an ack once the database stops answering.
HUNG_BOUND = TIMEOUT + 5.0
#: No ack may take this long, whatever else is wrong (a hang fails the test).
NEVER_HANG = 15.0
#: Stands for "no ack came" in :func:`call_all` results.
NO_ACK = "<no ack>"

ON_MARIADB = pytest.mark.parametrize("server_database", ["mariadb"], indirect=True)
ON_SQLITE = pytest.mark.parametrize("server_database", ["sqlite"], indirect=True)

ServerFactory = Callable[..., ServerProcess]
ClientFactory = Callable[..., socketio.Client]


# -- helpers ---------------------------------------------------------------------------


def new_token() -> str:
    return uuid.uuid4().hex[:16]


def call(
    client: socketio.Client, event: str, *args: Any, namespace: str = NS, timeout: float = 30
) -> Any:
    """One call; a missing ack fails the test (socketio's TimeoutError)."""
    data = None if not args else args[0] if len(args) == 1 else tuple(args)
    return client.call(event, data, namespace=namespace, timeout=timeout)


def timed_call(client: socketio.Client, event: str, *args: Any) -> tuple[Any, float]:
    started = time.monotonic()
    ack = call(client, event, *args)
    return ack, time.monotonic() - started


def call_all(
    jobs: Sequence[tuple[socketio.Client, str, tuple[Any, ...]]], timeout: float
) -> tuple[ThreadPoolExecutor, list[Any]]:
    """Start every ``(client, event, args)`` call at once, in threads; each future gives
    ``(ack, monotonic time the ack came)``, with :data:`NO_ACK` after ``timeout``."""

    def run(job: tuple[socketio.Client, str, tuple[Any, ...]]) -> tuple[Any, float]:
        client, event, args = job
        try:
            ack = call(client, event, *args, timeout=timeout)
        except socketio.exceptions.TimeoutError:
            ack = NO_ACK
        return ack, time.monotonic()

    pool = ThreadPoolExecutor(len(jobs))
    return pool, [pool.submit(run, job) for job in jobs]


def server_json(server: ServerProcess, path: str) -> Any:
    return json.loads(server.get(path))


def runs(server: ServerProcess, event: str, token: str) -> int:
    """How many times the server ran handler ``event`` for ``token`` (retries included)."""
    return int(server_json(server, "/tmo/metrics")["calls"].get(f"{event}:{token}", 0))


def event_stats(server: ServerProcess, event: str, namespace: str = NS) -> dict[str, Any]:
    stats: dict[str, Any] = server_json(server, "/tmo/metrics")["events"].get(
        f"{namespace}:{event}", {}
    )
    return stats


def retry_lines(server: ServerProcess, event: str) -> list[str]:
    """The WARNING retry lines the server logged for ``/tmo:<event>``."""
    pattern = rf"WARNING socketio_dbctx\.retry: retrying {re.escape(NS)}:{event} for sid .*"
    return re.findall(pattern, server.log())


def stored(server: ServerProcess, tokens: Sequence[str]) -> list[str]:
    """The ``tokens`` that have a committed ``tmo_rows`` row (a fresh direct connection)."""
    engine = sa.create_engine(server.database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            found = conn.execute(sa.text("SELECT token FROM tmo_rows")).scalars()
            return sorted(set(found) & set(tokens))
    finally:
        engine.dispose()


def assert_error_ack(ack: Any, code: str, retryable: bool) -> None:
    assert isinstance(ack, dict), ack
    assert set(ack) == {"error", "message", "retryable"}, ack
    assert ack["error"] == code, ack
    assert ack["retryable"] is retryable, ack
    assert isinstance(ack["message"], str) and ack["message"], ack
    for word in ("pg_sleep", "SLEEP", "SELECT", "tmo_rows", "canceling", "interrupted"):
        assert word not in ack["message"], f"the ack leaks {word!r}: {ack}"


@pytest.fixture
def connect_client(connect_client: ClientFactory) -> Iterator[ClientFactory]:
    """conftest's ``connect_client``, but at teardown the servers stop first (a client's
    WebSocket close otherwise waits up to 3 s for the server's close frame)."""
    used: list[tuple[socketio.Client, ServerProcess]] = []

    def connect(server: ServerProcess, namespace: str = NS, **kwargs: Any) -> socketio.Client:
        client = connect_client(server, namespace, **kwargs)
        used.append((client, server))
        return client

    yield connect
    for server in {id(server): server for _, server in used}.values():
        server.stop()
    deadline = time.monotonic() + 10
    for client, _ in used:
        while client.connected and time.monotonic() < deadline:
            time.sleep(0.02)


def start(
    server_factory: ServerFactory, async_mode: str, pool_size: int = 5, **config: Any
) -> ServerProcess:
    return server_factory(
        async_mode,
        pool_size=pool_size,
        extra=EXTRA,
        config={"DBCTX_STATEMENT_TIMEOUT": TIMEOUT, **config},
    )


# -- 1. PostgreSQL cuts a statement that runs too long ---------------------------------


@pytest.mark.postgres
def test_postgres_cuts_a_statement_longer_than_the_timeout(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """With ``DBCTX_STATEMENT_TIMEOUT=1``, ``pg_sleep(5)`` after an insert is cut by
    PostgreSQL after 1 s (before the client-side watchdog's 2.5 s): acked ``timeout``,
    ``retryable: false``, the handler ran once, the insert rolled back. Statements
    under the timeout succeed, before and after."""
    server = start(server_factory, async_mode)
    client = connect_client(server)
    quick = new_token()
    assert call(client, "slow", 0.2, new_token()) is True
    assert isinstance(call(client, "write_then_slow", quick, 0.2), dict)

    token = new_token()
    ack, seconds = timed_call(client, "write_then_slow", token, 5)

    assert_error_ack(ack, "timeout", retryable=False)
    assert TIMEOUT - 0.05 <= seconds < TIMEOUT + 1.4, f"cut after {seconds:.2f}s"
    assert runs(server, "write_then_slow", token) == 1
    assert retry_lines(server, "write_then_slow") == []
    stats = event_stats(server, "write_then_slow")
    assert stats["count"] == 2 and stats["errors"] == 1 and stats["retries"] == 0, stats
    assert stored(server, [quick, token]) == [quick]
    server.wait_checked_out(0)
    after = new_token()
    assert isinstance(call(client, "write", after), dict)  # the pool serves on
    assert runs(server, "write", after) == 1
    assert stored(server, [after]) == [after]
    server.wait_checked_out(0)


@pytest.mark.postgres
def test_time_between_statements_is_not_bounded(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """The bound is on each statement, not on the event: a handler that inserts,
    spends 2.7 s in Python (past the timeout and the watchdog's 1.5 s grace) with its
    transaction open, then inserts again, succeeds and stores both rows."""
    server = start(server_factory, async_mode)
    client = connect_client(server)
    token = new_token()

    ack, seconds = timed_call(client, "write_pause_write", token, TIMEOUT + 1.7)

    assert isinstance(ack, dict) and "id" in ack, ack
    assert seconds >= TIMEOUT + 1.7
    assert runs(server, "write_pause_write", token) == 1
    assert stored(server, [token, token + "-2"]) == sorted([token, token + "-2"])
    server.wait_checked_out(0)


# -- 2. which timeout applies ----------------------------------------------------------


def seconds_of(ack: Any) -> float:
    assert isinstance(ack, dict) and "seconds" in ack, ack
    return float(ack["seconds"])


@pytest.mark.parametrize("server_database", ["postgres", "mariadb"], indirect=True)
def test_decorator_beats_attribute_beats_config_and_none_turns_it_off(
    server_database: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """The timeout the database applies, read inside each handler: the decorator wins
    over the namespace attribute, which wins over ``DBCTX_STATEMENT_TIMEOUT``;
    ``@statement_timeout(None)`` turns it off, on namespace methods and ``@dbctx.on``
    functions alike (a 1.3 s statement then runs to its end
    under a 1 s config). Outside events, on the same pooled connection (pool of one),
    the value is the server's default 0 again. Without the config only the attribute
    and the decorators bound anything."""
    server = start(server_factory, "threading", pool_size=1)
    plain = connect_client(server, NS)
    attr = connect_client(server, ATTR_NS)
    function = connect_client(server, FUNCTION_NS)
    expected = [
        (plain, NS, "show", TIMEOUT),
        (plain, NS, "show_decorated", DECORATED_TIMEOUT),
        (plain, NS, "show_off", 0),
        (attr, ATTR_NS, "show", ATTR_TIMEOUT),
        (attr, ATTR_NS, "show_decorated", DECORATED_TIMEOUT),
        (attr, ATTR_NS, "show_in_body", BODY_TIMEOUT),
        (attr, ATTR_NS, "show_off", 0),
        (function, FUNCTION_NS, "show", TIMEOUT),
        (function, FUNCTION_NS, "show_decorated", DECORATED_TIMEOUT),
        (function, FUNCTION_NS, "show_off", 0),
    ]
    seen = {
        (namespace, event): call(client, event, namespace=namespace)
        for client, namespace, event, _ in expected
    }
    got = {key: seconds_of(ack) for key, ack in seen.items()}
    assert got == {(ns, event): float(want) for _, ns, event, want in expected}, seen
    backends = {ack["backend"] for ack in seen.values()}
    assert len(backends) == 1, seen  # one pooled connection served every event

    outside = server_json(server, "/tmo/outside")
    assert seconds_of(outside) == 0, outside
    assert outside["backend"] in backends, (outside, seen)  # that same connection
    if server_database == "postgres":
        assert outside["raw"] == "0", outside

    token = new_token()
    assert call(plain, "slow_off", 1.3, token) is True  # not cut at 1 s
    assert runs(server, "slow_off", token) == 1
    assert seconds_of(call(plain, "show")) == TIMEOUT  # the next event is bounded again
    assert seconds_of(server_json(server, "/tmo/outside")) == 0
    server.wait_checked_out(0)

    unset = server_factory("threading", pool_size=1, extra=EXTRA)
    plain = connect_client(unset, NS)
    attr = connect_client(unset, ATTR_NS)
    assert seconds_of(call(plain, "show")) == 0
    assert seconds_of(call(plain, "show_decorated")) == DECORATED_TIMEOUT
    assert seconds_of(call(attr, "show", namespace=ATTR_NS)) == ATTR_TIMEOUT
    assert seconds_of(call(attr, "show_off", namespace=ATTR_NS)) == 0
    assert seconds_of(server_json(unset, "/tmo/outside")) == 0
    unset.wait_checked_out(0)


# -- 3. MariaDB ------------------------------------------------------------------------


@ON_MARIADB
def test_mariadb_cuts_sleep_and_reuses_the_connection(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """``SLEEP(5)`` after an insert, under a 1 s timeout: acked ``timeout`` well within
    2.5 s, one run, the insert rolled back. The connection (a pool of one) is not
    thrown away for it: the next event runs on it with the timeout set again, and
    outside events ``@@max_statement_time`` on it is 0."""
    server = start(server_factory, async_mode, pool_size=1)
    client = connect_client(server)
    before = call(client, "show")
    assert seconds_of(before) == TIMEOUT

    token = new_token()
    ack, seconds = timed_call(client, "write_then_slow", token, 5)

    assert_error_ack(ack, "timeout", retryable=False)
    assert TIMEOUT - 0.05 <= seconds < 2.5, f"cut after {seconds:.2f}s"
    assert runs(server, "write_then_slow", token) == 1
    assert retry_lines(server, "write_then_slow") == []
    assert event_stats(server, "write_then_slow")["retries"] == 0
    assert stored(server, [token]) == []
    server.wait_checked_out(0)

    again = call(client, "show")
    assert seconds_of(again) == TIMEOUT and again["backend"] == before["backend"], again
    outside = server_json(server, "/tmo/outside")
    assert seconds_of(outside) == 0 and outside["backend"] == before["backend"], outside
    after = new_token()
    assert isinstance(call(client, "write", after), dict)
    assert stored(server, [after]) == [after]
    server.wait_checked_out(0)


# -- 4. SQLite -------------------------------------------------------------------------


@ON_SQLITE
def test_sqlite_slow_query_is_interrupted(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """A query sized to take ~10 s, after an insert, under a 1 s timeout: the
    watchdog's ``interrupt()`` cuts it: acked ``timeout``, one run, nothing stored."""
    server = start(server_factory, async_mode)
    client = connect_client(server)
    assert call(client, "slow", 0.1, new_token()) is True

    token = new_token()
    ack, seconds = timed_call(client, "write_then_slow", token, 10)

    assert_error_ack(ack, "timeout", retryable=False)
    assert TIMEOUT - 0.05 <= seconds < TIMEOUT + 2.5, f"cut after {seconds:.2f}s"
    assert runs(server, "write_then_slow", token) == 1
    assert retry_lines(server, "write_then_slow") == []
    assert stored(server, [token]) == []
    server.wait_checked_out(0)
    after = new_token()
    assert isinstance(call(client, "write", after), dict)
    assert stored(server, [after]) == [after]
    server.wait_checked_out(0)


# -- 5, 6. a database that stops answering ----------------------------------------------


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of PostgreSQL, forwarding."""
    url = sa.engine.make_url(postgres_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as running:
        yield running


def start_proxied(
    server_factory: ServerFactory,
    async_mode: str,
    proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
    application_name: str,
) -> ServerProcess:
    """A server whose database connections all go through ``proxy`` (no TLS)."""
    url = sa.engine.make_url(postgres_url).set(host="127.0.0.1", port=proxy.port)
    url = url.update_query_dict({"sslmode": "disable"})
    return start(
        server_factory,
        async_mode,
        SQLALCHEMY_DATABASE_URI=schema_url(url.render_as_string(hide_password=False), pg_schema),
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": 5,
            "max_overflow": 0,
            "pool_timeout": 5.0,
            # bounds a connect to a proxy that accepts and never answers (documented)
            "connect_args": {"connect_timeout": 2, "application_name": application_name},
        },
    )


def marks(server: ServerProcess) -> set[str]:
    """Tokens whose handler waits at the server module's gate right now."""
    return set(server_json(server, "/tmo/marks"))


def release(server: ServerProcess, tokens: Sequence[str]) -> None:
    server.get("/tmo/release?" + "&".join(f"token={token}" for token in tokens))


@pytest.mark.postgres
def test_hung_database_acks_every_event_in_bound(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
) -> None:
    """Four events have inserted a row and wait at a gate, each holding a pooled
    connection; the network to PostgreSQL is partitioned (nothing closed, nothing
    answered); then they send ``pg_sleep`` into it. Only the client side can end
    that: each is acked ``timeout`` (or ``db_unavailable``) within
    ``statement_timeout + 5 s`` of the statement, with no connection left checked out
    while the partition lasts. Once the network is back, four events at once all
    succeed on their first attempt: the cut connections were discarded, not pooled."""
    server = start_proxied(
        server_factory, async_mode, proxy, postgres_url, pg_schema, f"tmo-{new_token()}"
    )
    clients = [connect_client(server) for _ in range(2)]
    assert isinstance(call(clients[0], "write", new_token()), dict)  # pool warm
    tokens = [new_token() for _ in range(4)]
    jobs = [(clients[i % 2], "write_gate_slow", (token, 0.5)) for i, token in enumerate(tokens)]
    pool, futures = call_all(jobs, timeout=HUNG_BOUND + 10)
    try:
        wait_for(lambda: marks(server) >= set(tokens), 10, "4 events waiting at the gate")

        proxy.partition()
        released = time.monotonic()
        release(server, tokens)
        results = [future.result(timeout=HUNG_BOUND + 15) for future in futures]
    finally:
        pool.shutdown(wait=False)

    acks = [ack for ack, _ in results]
    late = [round(at - released, 2) for _, at in results if at - released > HUNG_BOUND]
    assert not late, f"acks {late}s after the statements went out; acks: {acks}"
    for ack in acks:
        assert isinstance(ack, dict) and ack.get("error") in ("timeout", "db_unavailable"), acks
        assert_error_ack(ack, ack["error"], retryable=ack["error"] == "db_unavailable")
    for ack, token in zip(acks, tokens):
        if ack["error"] == "timeout":
            assert runs(server, "write_gate_slow", token) == 1, (token, acks)
    server.wait_checked_out(0)  # still partitioned: the cut connections were let go

    proxy.restore()
    retries_before = event_stats(server, "write").get("retries", 0)
    after = [new_token() for _ in range(4)]
    pool, futures = call_all(
        [(clients[i % 2], "write", (token,)) for i, token in enumerate(after)], timeout=30
    )
    with pool:
        acks_after = [future.result(timeout=40)[0] for future in futures]
    assert all(isinstance(ack, dict) and "id" in ack for ack in acks_after), acks_after
    assert [runs(server, "write", token) for token in after] == [1] * 4
    assert event_stats(server, "write")["retries"] == retries_before
    assert retry_lines(server, "write") == []
    assert stored(server, [*tokens, *after]) == sorted(after)
    server.wait_checked_out(0)


def commit_into_partition(
    server: ServerProcess,
    client: socketio.Client,
    proxy: TcpProxy,
    token: str,
    wait: float = NEVER_HANG,
) -> tuple[Any, float]:
    """``write_hold_commit(token)``: partition the network while the event's COMMIT is
    held, then let it go out. ``(ack, seconds from the COMMIT to the ack)``, with
    :data:`NO_ACK` when none came within about ``wait`` seconds."""
    pool, futures = call_all([(client, "write_hold_commit", (token,))], timeout=wait)
    try:
        wait_for(lambda: token in marks(server), 10, "the event's COMMIT to be held")
        proxy.partition()
        released = time.monotonic()
        release(server, [token])
        ack, at = futures[0].result(timeout=wait + 10)
    finally:
        pool.shutdown(wait=False)
    return ack, at - released


@pytest.mark.postgres
def test_commit_without_an_answer_acks_outcome_unknown(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
) -> None:
    """An event inserts a row; just before its COMMIT goes out (SQLAlchemy's engine
    ``commit`` event, after the library asked for the transaction id) the network is
    partitioned, so the COMMIT never reaches PostgreSQL and no answer ever comes. The
    library cannot learn the outcome (the database is unreachable): acked
    ``outcome_unknown``, never a hang, the handler ran once, no connection kept.
    Back on the network, the row is not there and the next event succeeds on its
    first attempt. (The contract's tighter bound: the test below.)"""
    server = start_proxied(
        server_factory, async_mode, proxy, postgres_url, pg_schema, f"tmo-{new_token()}"
    )
    client = connect_client(server)
    assert isinstance(call(client, "write", new_token()), dict)  # pool warm
    token = new_token()

    ack, seconds = commit_into_partition(server, client, proxy, token)

    assert ack != NO_ACK, f"no ack {NEVER_HANG}s after the COMMIT went out"
    assert_error_ack(ack, "outcome_unknown", retryable=False)
    assert seconds >= TIMEOUT + 1.4, f"acked {seconds:.2f}s after COMMIT, before any cut"
    assert runs(server, "write_hold_commit", token) == 1
    assert retry_lines(server, "write_hold_commit") == []
    stats = event_stats(server, "write_hold_commit")
    assert stats["errors"] == 1 and stats["retries"] == 0, stats
    server.wait_checked_out(0)  # still partitioned: the cut connection was let go

    proxy.restore()
    assert stored(server, [token]) == []  # the COMMIT never reached the database
    after = new_token()
    assert isinstance(call(client, "write", after), dict)
    assert runs(server, "write", after) == 1
    assert retry_lines(server, "write") == []
    assert stored(server, [after]) == [after]
    server.wait_checked_out(0)


@pytest.mark.postgres
def test_commit_without_an_answer_is_acked_within_timeout_plus_5s(
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
) -> None:
    """The contract's bound on the same unanswered COMMIT, with the documented
    ``connect_timeout=2``: acked within ``statement_timeout + 5 s`` of the COMMIT (the
    resolution's fresh connection meets the same partition)."""
    server = start_proxied(
        server_factory, "threading", proxy, postgres_url, pg_schema, f"tmo-{new_token()}"
    )
    client = connect_client(server)
    assert isinstance(call(client, "write", new_token()), dict)  # pool warm

    ack, seconds = commit_into_partition(server, client, proxy, new_token(), HUNG_BOUND + 1)

    assert seconds <= HUNG_BOUND, f"acked {seconds:.2f}s after the COMMIT went out: {ack}"
    assert_error_ack(ack, "outcome_unknown", retryable=False)


# -- 7. bad values fail at set-up --------------------------------------------------------

BAD_TIMEOUTS = [0, -1, -0.5, True, False, "5", float("nan"), float("inf"), [1]]
GOOD_TIMEOUTS = [0.001, 0.5, 1, 30, None]


def plain_app() -> tuple[Flask, SQLAlchemy]:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    db = SQLAlchemy()
    db.init_app(app)
    return app, db


def bad_id(value: Any) -> str:
    return repr(value) if not (isinstance(value, float) and math.isnan(value)) else "nan"


@pytest.mark.parametrize("where", ["app_config", "option"])
@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=bad_id)
def test_bad_statement_timeout_setting_fails_at_init(value: Any, where: str) -> None:
    app, db = plain_app()
    socketio_server = SocketIO(app, async_mode="threading")
    with pytest.raises(ContextSetupError, match="DBCTX_STATEMENT_TIMEOUT"):
        if where == "app_config":
            app.config["DBCTX_STATEMENT_TIMEOUT"] = value
            DBContext(app, socketio_server, db)
        else:
            DBContext(app, socketio_server, db, statement_timeout=value)
    assert "dbctx" not in app.extensions


@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=bad_id)
def test_bad_statement_timeout_decorator_fails_at_decoration(value: Any) -> None:
    with pytest.raises(ContextSetupError, match="STATEMENT_TIMEOUT"):
        socketio_dbctx.statement_timeout(value)


@pytest.mark.parametrize("value", GOOD_TIMEOUTS)
def test_good_statement_timeouts_are_accepted(value: Any) -> None:
    app, db = plain_app()
    app.config["DBCTX_STATEMENT_TIMEOUT"] = value
    assert app.extensions.get("dbctx") is None
    dbctx = DBContext(app, SocketIO(app, async_mode="threading"), db)
    assert app.extensions["dbctx"] is dbctx

    @socketio_dbctx.statement_timeout(value)
    def handler() -> None:
        pass

    assert callable(handler)
