"""``socketio_dbctx.aio`` on real servers: python-socketio's ``AsyncServer`` under
uvicorn (``tests/servers/aio_app.py``), PostgreSQL through asyncpg, real python-socketio
clients over WebSocket.

Each test gets its own schema and server. Covered: commit before the ack, rollback and
dropped emits on error, safe error acks, the argument check, refused connects, function
handlers, retries of a killed backend and of a serialization failure, 200 concurrent
events never sharing a session, admission on a pool smaller than the load (no pool
timeout), the statement timeout, the watchdog on a partitioned network, idempotency
keys, ``session_scope`` in background and periodic tasks, leak reports, drain, malformed
packets, and the pool dict, metrics and health in the Flask version's shapes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import socketio
import sqlalchemy as sa
from aiokit import UvicornServer, asyncpg_url, start_uvicorn
from eventkit import RawClient, malformed_frames, new_token

pytestmark = pytest.mark.server

NS = "/a"


class AioServer(UvicornServer):
    """A uvicorn process serving ``tests.servers.aio_app``."""

    def drain(self) -> bool:
        return bool(json.loads(self.get("/drain", timeout=20))["drained"])

    def runs(self, event: str, token: str) -> int:
        return int(self.state()["runs"].get(f"{event}:{token}", 0))


AioFactory = Callable[..., AioServer]


@pytest.fixture
def db_check(postgres_url: str, pg_schema: str) -> Iterator[sa.Engine]:
    """A psycopg2 engine on the test's schema, which holds ``aio_rows`` and the keys."""
    engine = sa.create_engine(
        postgres_url,
        connect_args={"options": f"-csearch_path={pg_schema}"},
        poolclass=sa.pool.NullPool,
    )
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE aio_rows (id serial PRIMARY KEY, token text NOT NULL)")
    from socketio_dbctx import idempotency_table

    idempotency_table(sa.MetaData()).create(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def aio_server(
    postgres_url: str, pg_schema: str, db_check: sa.Engine, tmp_path: Path
) -> Iterator[AioFactory]:
    pytest.importorskip("asyncpg", reason="the test extra installs asyncpg")
    started: list[AioServer] = []

    def start(pool: str = "5,0,30", database_url: str | None = None, **options: Any) -> AioServer:
        env = {
            "AIO_DATABASE_URL": database_url or asyncpg_url(postgres_url),
            "AIO_SCHEMA": pg_schema,
            "AIO_POOL": pool,
            "AIO_OPTIONS": json.dumps(options),
        }
        server = start_uvicorn("tests.servers.aio_app:app", env, tmp_path, AioServer)
        started.append(server)  # type: ignore[arg-type]
        return server  # type: ignore[return-value]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def client_factory() -> Iterator[Callable[..., socketio.Client]]:
    clients: list[socketio.Client] = []

    def connect(
        server: AioServer, auth: Any = None, listen: list[Any] | None = None
    ) -> socketio.Client:
        client = socketio.Client(reconnection=False)
        if listen is not None:
            client.on("written", listen.append, namespace=NS)
        client.connect(
            server.url, namespaces=[NS], transports=["websocket"], auth=auth, wait_timeout=10
        )
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.disconnect()


def stored(engine: sa.Engine, token: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM aio_rows WHERE token = :t"), {"t": token}
            ).scalar()
        )


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_error(ack: Any, code: str, retryable: bool = False) -> None:
    assert isinstance(ack, dict) and ack.get("error") == code, ack
    assert ack["retryable"] is retryable, ack
    assert "secret" not in json.dumps(ack) and "SELECT" not in json.dumps(ack), ack


# -- semantics ---------------------------------------------------------------------


def test_commit_before_the_ack_and_the_emit_after_it(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    server = aio_server()
    heard: list[Any] = []
    client = client_factory(server, listen=heard)
    token = new_token()
    seen_at_ack: list[int] = []

    ack = client.call("write", token, namespace=NS, timeout=10)
    seen_at_ack.append(stored(db_check, token))

    assert ack["token"] == token and seen_at_ack == [1]
    wait_for(lambda: heard == [token], "the held emit")
    assert server.runs("write", token) == 1
    server.wait_checked_out(0)


def test_a_failing_handler_rolls_back_drops_its_emits_and_acks_safely(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    server = aio_server()
    heard: list[Any] = []
    client = client_factory(server, listen=heard)
    token, marker = new_token(), new_token()

    assert_error(client.call("fail", token, namespace=NS, timeout=10), "internal_error")
    assert_error(client.call("invalid", namespace=NS, timeout=10), "invalid_request")
    arity = client.call("write", namespace=NS, timeout=10)
    assert_error(arity, "invalid_request")
    client.call("write", marker, namespace=NS, timeout=10)  # a later emit proves absence

    wait_for(lambda: marker in heard, "the marker emit")
    assert heard == [marker]
    assert stored(db_check, token) == 0
    assert server.runs("fail", token) == 1
    metrics = server.state()["metrics"]
    assert metrics["/a:fail"]["errors"] == 1 and metrics["/a:write"]["count"] == 2
    server.wait_checked_out(0)


def test_malformed_packets_are_dropped_or_acked_invalid_request(
    aio_server: AioFactory, db_check: sa.Engine
) -> None:
    """The Flask version's packet guard on an ``AsyncServer``: events of the wrong shape
    acked ``invalid_request``, undecodable packets dropped, one log line per kind and no
    traceback, nothing run or stored, and the connection goes on working."""
    server = aio_server()
    acked, dropped = malformed_frames(NS)
    client = RawClient(server.url, NS)
    token = new_token()
    try:
        for frame, _ in acked:
            client.send(frame)
        for id in (1, 2, 3):
            assert_error(client.ack(id), "invalid_request")
        for frame, _ in dropped:
            client.send(frame)
        # a binary event whose name is not a string, judged once its attachment is in
        client.send(f'451-{NS},7[123,{{"_placeholder":true,"num":0}}]')
        client.send(b"attached")
        assert_error(client.ack(7), "invalid_request")
        client.send(f'42{NS},8["write","{token}"]')
        assert client.ack(8)["token"] == token
    finally:
        client.close()
    assert stored(db_check, token) == 1
    server.wait_checked_out(0)
    log = server.log()
    assert "Traceback" not in log, log[-6000:]
    for _, kind in [*acked, *dropped]:
        lines = [line for line in log.splitlines() if "malformed packet" in line and kind in line]
        assert len(lines) == 1, (kind, lines, log[-4000:])


def test_refused_connect_and_function_handlers(
    aio_server: AioFactory, client_factory: Any
) -> None:
    server = aio_server()
    with pytest.raises(socketio.exceptions.ConnectionError):
        client_factory(server, auth={"refuse": True})
    client = client_factory(server)
    assert client.call("double", 21, namespace=NS, timeout=10) == 42
    server.wait_checked_out(0)


# -- faults and concurrency ----------------------------------------------------------------


def test_a_killed_backend_is_retried_and_stored_once(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    server = aio_server(retry_delay=0)
    client = client_factory(server)
    token = new_token()

    assert client.call("kill_self", (token, 1), namespace=NS, timeout=15) == token

    assert server.runs("kill_self", token) == 2
    assert stored(db_check, token) == 1
    assert server.state()["metrics"]["/a:kill_self"]["retries"] == 1
    server.wait_checked_out(0)


def test_a_serialization_failure_is_retried_from_the_start(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    server = aio_server(retry_delay=0)
    client = client_factory(server)
    token = new_token()
    assert client.call("serialize", (token, 2), namespace=NS, timeout=15) == token
    assert server.runs("serialize", token) == 3
    assert stored(db_check, token) == 1  # the failed attempts' inserts were rolled back
    assert server.state()["metrics"]["/a:serialize"]["retries"] == 2
    server.wait_checked_out(0)


def test_two_hundred_concurrent_events_never_share_a_session(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    server = aio_server(pool="10,0,30", max_in_flight_per_client=0)
    clients = [client_factory(server) for _ in range(4)]
    tokens = [new_token() for _ in range(200)]
    acks: dict[str, Any] = {}
    done = threading.Event()

    def answered(token: str) -> Callable[[Any], None]:
        def record(alone: Any) -> None:
            acks[token] = alone
            if len(acks) == len(tokens):
                done.set()

        return record

    for index, token in enumerate(tokens):  # all sent before any answer is awaited
        clients[index % 4].emit("overlap", token, namespace=NS, callback=answered(token))
    assert done.wait(60), f"{len(tokens) - len(acks)} events without an ack"

    shared = {token: ack for token, ack in acks.items() if ack is not True}
    assert not shared, (
        f"{len(shared)} events shared a session or failed: {list(shared.values())[:3]}"
    )
    with db_check.connect() as conn:
        assert conn.execute(sa.text("SELECT count(DISTINCT token) FROM aio_rows")).scalar() == 200
    assert "QueuePool limit" not in server.log() and "TimeoutError" not in server.log()
    server.wait_checked_out(0)


def test_admission_on_a_pool_smaller_than_the_load(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    """Pool 2 + 0 with a 1 s pool timeout, 12 events each holding a connection 0.3 s:
    the extension admits 2 at a time, so no checkout ever waits for the pool."""
    server = aio_server(pool="2,0,1", queue_timeout=30)
    clients = [client_factory(server) for _ in range(6)]
    tokens = [new_token() for _ in range(12)]
    acks: dict[str, Any] = {}
    done = threading.Event()

    def answered(token: str) -> Callable[[Any], None]:
        def record(ack: Any) -> None:
            acks[token] = ack
            if len(acks) == len(tokens):
                done.set()

        return record

    for index, token in enumerate(tokens):
        clients[index % 6].emit("hold", (token, 0.3), namespace=NS, callback=answered(token))
    assert done.wait(60)

    assert acks == {token: token for token in tokens}
    assert server.state()["metrics"]["/a:hold"]["errors"] == 0
    assert "TimeoutError" not in server.log()
    server.wait_checked_out(0)


# -- timeouts, keys, scopes, drain -------------------------------------------------------------


def test_the_statement_timeout_cuts_a_slow_statement(
    aio_server: AioFactory, client_factory: Any
) -> None:
    server = aio_server(statement_timeout=0.5)
    client = client_factory(server)
    start = time.monotonic()
    ack = client.call("slow", 3, namespace=NS, timeout=15)
    assert_error(ack, "timeout")
    assert time.monotonic() - start < 2.5
    assert client.call("slow", 0.05, namespace=NS, timeout=10) == "slept"
    server.wait_checked_out(0)


def test_an_idempotency_key_answers_a_repeat_with_the_stored_ack(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    server = aio_server()
    heard: list[Any] = []
    first, second = client_factory(server, listen=heard), client_factory(server)
    key, token, marker = new_token(), new_token(), new_token()

    one = first.call("keyed", {"key": key, "token": token}, namespace=NS, timeout=10)
    two = second.call("keyed", {"key": key, "token": "other"}, namespace=NS, timeout=10)
    first.call("write", marker, namespace=NS, timeout=10)

    assert one == two == {"token": token}
    wait_for(lambda: marker in heard, "the marker emit")
    assert heard == [token, marker]  # the repeat emitted nothing
    assert server.runs("keyed", token) == 1 and server.runs("keyed", "other") == 0
    assert stored(db_check, token) == 1 and stored(db_check, "other") == 0
    assert_error(
        first.call("keyed", {"key": 1.5, "token": "x"}, namespace=NS, timeout=10),
        "invalid_request",
    )
    server.wait_checked_out(0)


def test_a_background_task_runs_in_its_own_scope(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    server = aio_server()
    client = client_factory(server)
    token = new_token()
    assert client.call("background", token, namespace=NS, timeout=10) == "started"
    wait_for(lambda: stored(db_check, token) == 1, "the task's commit")
    server.wait_checked_out(0)


def test_drain_refuses_new_events_and_reports_it(
    aio_server: AioFactory, client_factory: Any
) -> None:
    server = aio_server()
    client = client_factory(server)
    before = server.state()
    assert before["health"]["healthy"] is True and before["status"] == "healthy"
    assert set(before["pool"]) >= {"bind", "size", "checked_out", "capacity", "status"}

    assert server.drain() is True

    ack = client.call("write", new_token(), namespace=NS, timeout=10)
    assert_error(ack, "busy", retryable=True)
    assert ack["retry_after_ms"] > 0
    after = server.state()
    assert after["health"] == {"healthy": False, "latency_ms": 0.0, "error": "draining"}
    assert after["status"] == "draining"


def test_a_database_that_stops_answering_is_cut_by_the_watchdog(
    aio_server: AioFactory, client_factory: Any, postgres_url: str, db_check: sa.Engine
) -> None:
    """Through a TCP proxy that partitions the network: a statement gets no answer, the
    watchdog shuts its socket 1.5 s past the 1 s statement timeout, and the event is
    acked ``timeout`` within timeout + 5 s; once the network is back the next event
    succeeds on its first attempt (the cut connection was discarded)."""
    from tcp_proxy import TcpProxy

    url = sa.engine.make_url(postgres_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = sa.engine.make_url(asyncpg_url(postgres_url)).set(
            host="127.0.0.1", port=proxy.port, query={"ssl": "disable"}
        )
        server = aio_server(
            database_url=proxied.render_as_string(hide_password=False),
            statement_timeout=1,
            retry_delay=0,
        )
        client = client_factory(server)
        assert client.call("write", new_token(), namespace=NS, timeout=10)["token"]  # pool warm
        token = new_token()

        proxy.partition()
        start = time.monotonic()
        ack = client.call("write", token, namespace=NS, timeout=15)
        took = time.monotonic() - start
        proxy.restore()

        assert_error(ack, "timeout")
        assert took <= 1 + 5, took
        assert server.runs("write", token) == 1
        after = new_token()
        assert client.call("write", after, namespace=NS, timeout=10)["token"] == after
        assert server.state()["metrics"]["/a:write"]["retries"] == 0
        assert stored(db_check, token) == 0 and stored(db_check, after) == 1
        server.wait_checked_out(0)


def test_a_periodic_task_runs_each_time_in_its_own_scope(
    aio_server: AioFactory, client_factory: Any, db_check: sa.Engine
) -> None:
    server = aio_server()
    client = client_factory(server)
    token = new_token()
    assert client.call("periodic", (token, 0.05), namespace=NS, timeout=10) == "started"
    wait_for(lambda: stored(db_check, token) >= 3, "three committed runs")
    result = client.call("stop_periodic", token, namespace=NS, timeout=10)
    assert result["stopped"] is True and result["failures"] == 0
    assert stored(db_check, token) == result["runs"]  # every run committed, once
    server.wait_checked_out(0)


def test_a_connection_held_past_the_leak_threshold_is_reported(
    aio_server: AioFactory, client_factory: Any
) -> None:
    server = aio_server(leak_threshold=0.3)
    client = client_factory(server)
    token = new_token()
    assert client.call("hold", (token, 1.0), namespace=NS, timeout=10) == token
    wait_for(lambda: "apparent connection leak" in server.log(), "the leak report")
    assert "/a:hold" in server.log()
    server.wait_checked_out(0)


def test_the_extension_keeps_the_users_session_classes(postgres_url: str) -> None:
    """Our listeners go on a ``Session`` subclass of our own in a copy of the maker: the
    user's ``AsyncSession`` class, sync session class and options stay as given, and
    the user's own maker is left untouched."""
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
    from sqlalchemy.orm import Session

    from socketio_dbctx.aio import AsyncDBContext

    class Mine(AsyncSession):
        pass

    class MySync(Session):
        pass

    engine = create_async_engine(asyncpg_url(postgres_url))
    maker = async_sessionmaker(
        engine, class_=Mine, sync_session_class=MySync, expire_on_commit=False
    )
    dbctx = AsyncDBContext(socketio.AsyncServer(async_mode="asgi"), maker)
    ours = dbctx.state.maker
    assert ours.class_ is Mine and issubclass(ours.kw["sync_session_class"], MySync)
    assert ours.kw["expire_on_commit"] is False and ours.kw["bind"] is engine
    assert maker.kw["sync_session_class"] is MySync  # the user's maker is untouched
