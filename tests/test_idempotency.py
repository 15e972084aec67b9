"""Idempotency keys: a repeat of a key is answered from the store, on real servers.

Real servers (``tests.servers.reliability``, namespaces ``/r`` and ``/rk``) and real
python-socketio clients check what clients depend on: a repeat of a key, from another
client or another worker sharing the database, gets the stored ack without running
the handler or broadcasting again; keys are independent per event and per namespace;
a failed run releases its key; two truly concurrent runs of one key apply once (the
first run is held inside its handler by a gate the test opens over HTTP, while the
second is sent and waits); keys expire after ``DBCTX_IDEMPOTENCY_TTL`` and the purge
removes expired rows. The Flask-SocketIO test client checks the key validation
(``invalid_request`` for a bad key) and ``create_tables()`` against
``idempotency_table(MetaData())`` on PostgreSQL, MariaDB and SQLite.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import pytest
import socketio
import sqlalchemy as sa
from conftest import ALL_DATABASES, ServerProcess, checked_out, wait_for
from eventkit import assert_error_ack, direct_connection, new_token, servers_stop_first
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from test_outcomes import (
    CONFIG,
    EXTRA,
    IDEMPOTENCY_TABLE,
    KEYED_NS,
    NS,
    Listener,
    call,
    purge_expired_key_now,
    runs,
    start,
    stored,
    written_ack,
)

import socketio_dbctx
from socketio_dbctx import DBContext, DBContextNamespace

pytestmark = pytest.mark.server

ServerFactory = Callable[..., ServerProcess]
ClientFactory = Callable[..., socketio.Client]


@pytest.fixture
def connect_client(connect_client: ClientFactory) -> Iterator[ClientFactory]:
    """Clients on ``/r``; the servers stop before the clients disconnect."""
    yield from servers_stop_first(connect_client, NS)


def key_rows(server: ServerProcess, key: str) -> int:
    """Rows of ``key`` in the idempotency table (any namespace or event)."""
    with direct_connection(server) as conn:
        table = sa.Table(IDEMPOTENCY_TABLE, sa.MetaData(), autoload_with=conn)
        query = sa.select(sa.func.count()).select_from(table).where(table.c.key == key)
        return int(conn.execute(query).scalar_one())


def entered(server: ServerProcess) -> list[str]:
    data: list[str] = json.loads(server.get("/r/metrics"))["entered"]
    return data


# -- a repeat is answered from the store -----------------------------------------------


def test_repeat_of_a_key_gets_the_stored_ack_and_keys_are_separate(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """A key answered once is answered from the store for any client: the handler does
    not run again and nothing is broadcast again. The same key on another event, or on
    another namespace (keyed by its class attribute), is a key of its own; a request
    without a key runs every time; an int is a key too."""
    server = start(server_factory, async_mode)
    first, second = connect_client(server), connect_client(server)
    listener = Listener(connect_client(server))
    keyed_first = connect_client(server, KEYED_NS)
    keyed_second = connect_client(server, KEYED_NS)
    keyed_listener = Listener(connect_client(server, KEYED_NS), KEYED_NS)
    key, tokens = f"req-{new_token()}", [new_token() for _ in range(8)]

    ack = call(first, "keyed_write", {"token": tokens[0], "key": key})
    again = call(second, "keyed_write", {"token": tokens[1], "key": key})
    other_event = call(second, "keyed_other", {"token": tokens[2], "key": key})
    other_ns = call(
        keyed_first, "keyed_write", {"token": tokens[3], "key": key}, namespace=KEYED_NS
    )
    other_ns_again = call(
        keyed_second, "keyed_write", {"token": tokens[4], "key": key}, namespace=KEYED_NS
    )
    no_key = [call(first, "keyed_write", {"token": tokens[5]}) for _ in range(2)]
    int_key = [
        call(client, "keyed_write", {"token": token, "key": 42})
        for client, token in ((first, tokens[6]), (second, tokens[7]))
    ]

    assert ack == written_ack(tokens[0], "keyed_write")
    assert again == ack  # the first run's ack, not a run of its own
    assert other_event == written_ack(tokens[2], "keyed_other")
    assert other_ns == written_ack(tokens[3], "keyed_write")
    assert other_ns_again == other_ns
    assert no_key == [written_ack(tokens[5], "keyed_write", run) for run in (1, 2)]
    assert int_key == [written_ack(tokens[6], "keyed_write")] * 2
    ran = {
        token: runs(server, event, token, namespace)
        for token, event, namespace in [
            (tokens[0], "keyed_write", NS),
            (tokens[1], "keyed_write", NS),
            (tokens[2], "keyed_other", NS),
            (tokens[3], "keyed_write", KEYED_NS),
            (tokens[4], "keyed_write", KEYED_NS),
            (tokens[5], "keyed_write", NS),
            (tokens[6], "keyed_write", NS),
            (tokens[7], "keyed_write", NS),
        ]
    }
    assert list(ran.values()) == [1, 0, 1, 1, 0, 2, 1, 0], ran
    listener.settle(first)
    keyed_listener.settle(keyed_first)
    heard = [listener.count(token) for token in tokens]
    heard[3] = keyed_listener.count(tokens[3])
    heard[4] = keyed_listener.count(tokens[4])
    assert heard == [1, 0, 1, 1, 0, 2, 1, 0], heard
    assert [stored(server, token) for token in tokens] == [1, 0, 1, 1, 0, 2, 1, 0]
    assert key_rows(server, key) == 3  # /r keyed_write, /r keyed_other, /rk keyed_write
    server.wait_checked_out(0)


def test_a_failed_run_releases_its_key(
    server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """A run that raises stores nothing, its key included: the next run of the key
    runs the handler, and its ack is the one stored."""
    server = start(server_factory, "threading")
    client = connect_client(server)
    key, tokens = new_token(), [new_token() for _ in range(3)]

    failed = call(client, "keyed_write", {"token": tokens[0], "key": key, "fail": True})
    assert_error_ack(failed, "internal_error", retryable=False)
    assert key_rows(server, key) == 0
    ack = call(client, "keyed_write", {"token": tokens[1], "key": key})
    again = call(client, "keyed_write", {"token": tokens[2], "key": key})

    assert ack == again == written_ack(tokens[1], "keyed_write")
    assert [runs(server, "keyed_write", token) for token in tokens] == [1, 1, 0]
    assert [stored(server, token) for token in tokens] == [0, 1, 0]
    assert key_rows(server, key) == 1
    server.wait_checked_out(0)


# -- two runs of one key at once -------------------------------------------------------


@pytest.mark.parametrize("server_database", ["postgres", "mariadb"], indirect=True)
def test_concurrent_runs_of_one_key_apply_once(
    async_mode: str,
    server_database: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
) -> None:
    """The first run of a key is held inside its handler (its row and its claim
    uncommitted) while a second run of the key, from another client, is sent. The
    second waits for the first; once the test lets the first finish, both get the
    first run's ack and the handler ran once."""
    app_name = f"keys-{new_token()}"
    config: dict[str, Any] = {}
    if server_database == "postgres":  # to tell the server's backends from any others
        config["SQLALCHEMY_ENGINE_OPTIONS"] = {
            "pool_size": 5,
            "max_overflow": 0,
            "connect_args": {"application_name": app_name},
        }
    server = start(server_factory, async_mode, **config)
    first, second = connect_client(server), connect_client(server)
    key, gate = new_token(), new_token()
    tokens = [new_token(), new_token()]

    with ThreadPoolExecutor(2) as pool:
        held: Future[Any] = pool.submit(
            call, first, "keyed_write", {"token": tokens[0], "key": key, "gate": gate}
        )
        wait_for(lambda: gate in entered(server), 10, "the first run to reach its gate")
        waiting: Future[Any] = pool.submit(
            call, second, "keyed_write", {"token": tokens[1], "key": key}
        )
        wait_for(lambda: second_waits(server, app_name), 10, "the second run to wait")
        assert not held.done() and not waiting.done()
        server.get(f"/r/gate/{gate}")
        acks = [held.result(timeout=30), waiting.result(timeout=30)]

    assert acks == [written_ack(tokens[0], "keyed_write")] * 2, acks
    assert [runs(server, "keyed_write", token) for token in tokens] == [1, 0]
    assert [stored(server, token) for token in tokens] == [1, 0]
    assert key_rows(server, key) == 1
    server.wait_checked_out(0)


def second_waits(server: ServerProcess, app_name: str) -> bool:
    """True while a transaction of the server waits for a row lock (the first run's
    uncommitted claim): on PostgreSQL a backend named ``app_name`` waiting for a
    ``Lock``; on MariaDB an InnoDB transaction in ``LOCK WAIT`` on the server's
    database."""
    engine = sa.create_engine(server.database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                query = sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND application_name = :name"
                ).bindparams(name=app_name)
            else:
                query = sa.text(
                    "SELECT count(*) FROM information_schema.INNODB_TRX t "
                    "JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id "
                    "WHERE t.trx_state = 'LOCK WAIT' AND p.DB = DATABASE()"
                )
            return bool(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


# -- several workers, expiry -----------------------------------------------------------


def test_a_key_answered_on_one_worker_is_answered_from_the_store_on_another(
    server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """Two workers on one database schema: the key's ack stored by worker A answers
    the repeat on worker B, whose handler never runs."""
    worker_a = start(server_factory, "eventlet")
    worker_b = server_factory("gevent", extra=EXTRA, config=CONFIG, share_schema_with=worker_a)
    key, tokens = new_token(), [new_token(), new_token()]

    ack = call(connect_client(worker_a), "keyed_write", {"token": tokens[0], "key": key})
    again = call(connect_client(worker_b), "keyed_write", {"token": tokens[1], "key": key})

    assert again == ack == written_ack(tokens[0], "keyed_write")
    assert runs(worker_a, "keyed_write", tokens[0]) == 1
    assert runs(worker_b, "keyed_write", tokens[1]) == 0
    assert stored(worker_a, tokens[1]) == 0
    worker_a.wait_checked_out(0)
    worker_b.wait_checked_out(0)


def test_expired_keys_run_again_and_are_purged(
    server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """With ``DBCTX_IDEMPOTENCY_TTL=1`` a key runs again once its second is up, and
    the background purge (triggered by keyed events) deletes expired rows."""
    server = start(server_factory, "threading", DBCTX_IDEMPOTENCY_TTL=1)
    client = connect_client(server)
    key, purged_key = new_token(), new_token()
    first_token = new_token()
    assert call(client, "keyed_write", {"token": first_token, "key": key})["run"] == 1
    call(client, "keyed_write", {"token": new_token(), "key": purged_key})

    tokens: list[str] = []

    def runs_again() -> bool:
        tokens.append(new_token())
        ack = call(client, "keyed_write", {"token": tokens[-1], "key": key})
        return bool(ack == written_ack(tokens[-1], "keyed_write"))

    wait_for(runs_again, 10, "the expired key to run again", interval=0.2)
    assert runs(server, "keyed_write", first_token) == 1
    assert [runs(server, "keyed_write", token) for token in tokens] == [0] * (len(tokens) - 1) + [
        1
    ]
    assert key_rows(server, key) == 1  # the new run's row replaced the expired one

    def purged() -> bool:
        call(client, "keyed_write", {"token": new_token(), "key": new_token()})  # a trigger
        return key_rows(server, purged_key) == 0

    wait_for(purged, 15, "the expired key's row to be purged", interval=0.5)
    server.wait_checked_out(0)


def plant_key(server: ServerProcess, key: str, ack: Any, expires_at: float) -> None:
    """Write a key's row straight into the table: ``/r`` ``keyed_write``."""
    engine = sa.create_engine(server.database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            table = sa.Table(IDEMPOTENCY_TABLE, sa.MetaData(), autoload_with=conn)
            conn.execute(
                table.insert().values(
                    namespace=NS,
                    event="keyed_write",
                    key=key,
                    ack=json.dumps(ack),
                    expires_at=expires_at,
                )
            )
    finally:
        engine.dispose()


def test_the_stored_row_answers_until_it_expires_purge_or_not(
    server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """With no purge due (``DBCTX_IDEMPOTENCY_TTL=30``: one purge per 30 s, and it has
    just run), a key whose row is in the table answers with the row's ack while it
    lives, and runs the handler again once ``expires_at`` has passed; the new run's
    ack replaces the old one."""
    server = start(server_factory, "threading", DBCTX_IDEMPOTENCY_TTL=30)
    client = connect_client(server)
    purge_expired_key_now(server, client, "keyed_write")
    live, expired = new_token(), new_token()
    plant_key(server, live, {"planted": "live"}, time.time() + 3600)
    plant_key(server, expired, {"planted": "expired"}, 1.0)
    tokens = [new_token() for _ in range(3)]

    assert call(client, "keyed_write", {"token": tokens[0], "key": live}) == {"planted": "live"}
    ack = call(client, "keyed_write", {"token": tokens[1], "key": expired})
    again = call(client, "keyed_write", {"token": tokens[2], "key": expired})

    assert ack == again == written_ack(tokens[1], "keyed_write")
    assert [runs(server, "keyed_write", token) for token in tokens] == [0, 1, 0]
    assert key_rows(server, expired) == 1
    server.wait_checked_out(0)


# -- key validation and the table, in process ------------------------------------------


@pytest.fixture
def keyed_app(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> tuple[Any, list[Any], Any]:
    """``/k`` with ``keyed(data)`` keyed by ``data["k"]`` and ``broken(data)`` whose key
    function raises; both insert an ``items`` row named ``data["name"]``. Returns
    ``(test client, list of handler runs, dbctx)``."""
    dbctx = DBContext(app, socketio, db, retry_delay=0)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "k_items"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(80), nullable=False)

    ran: list[Any] = []

    def broken_key(data: Any) -> Any:
        raise LookupError("the key function fails")

    class Keyed(DBContextNamespace):
        @socketio_dbctx.idempotency_key(lambda data: data["k"])
        def on_keyed(self, data: Any) -> dict[str, Any]:
            ran.append(data)
            db.session.add(Item(name=data["name"]))
            return {"name": data["name"]}

        @socketio_dbctx.idempotency_key(broken_key)
        def on_broken(self, data: Any) -> dict[str, Any]:
            ran.append(data)
            db.session.add(Item(name=data["name"]))
            return {"name": data["name"]}

    socketio.on_namespace(Keyed("/k"))
    with app.app_context():
        db.create_all()
        dbctx.create_tables()
    client = socketio.test_client(app, namespace="/k")
    assert client.is_connected("/k")
    return client, ran, dbctx


def table_rows(db: SQLAlchemy, app: Flask, table: str) -> int:
    with app.app_context():
        return int(db.session.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.mark.parametrize(
    "key",
    [1.5, True, False, ["a"], {"a": 1}, "", "x" * 256],
    ids=["float", "true", "false", "list", "dict", "empty", "256-chars"],
)
def test_a_bad_key_is_an_invalid_request(
    keyed_app: tuple[Any, list[Any], Any], db: SQLAlchemy, app: Flask, key: Any
) -> None:
    client, ran, _ = keyed_app
    ack = client.emit("keyed", {"k": key, "name": "n"}, namespace="/k", callback=True)
    assert_error_ack(ack, "invalid_request", retryable=False)
    assert ran == []
    assert table_rows(db, app, "k_items") == 0
    assert table_rows(db, app, IDEMPOTENCY_TABLE) == 0
    assert checked_out(db, app) == 0


def test_a_raising_key_function_is_an_invalid_request(
    keyed_app: tuple[Any, list[Any], Any], db: SQLAlchemy, app: Flask
) -> None:
    client, ran, _ = keyed_app
    ack = client.emit("broken", {"name": "n"}, namespace="/k", callback=True)
    assert_error_ack(ack, "invalid_request", retryable=False)
    assert ran == []
    assert table_rows(db, app, "k_items") == 0
    assert table_rows(db, app, IDEMPOTENCY_TABLE) == 0
    assert checked_out(db, app) == 0


@ALL_DATABASES
@pytest.mark.parametrize(
    "key", ["x" * 255, 7, -1, "é" * 255], ids=["255-chars", "int", "negative-int", "255-wide"]
)
def test_a_good_key_is_stored_and_answers_its_repeat(
    keyed_app: tuple[Any, list[Any], Any], db: SQLAlchemy, app: Flask, key: Any
) -> None:
    client, ran, _ = keyed_app
    ack = client.emit("keyed", {"k": key, "name": "a"}, namespace="/k", callback=True)
    again = client.emit("keyed", {"k": key, "name": "b"}, namespace="/k", callback=True)
    assert ack == again == {"name": "a"}
    assert [data["name"] for data in ran] == ["a"]
    assert table_rows(db, app, "k_items") == 1
    assert table_rows(db, app, IDEMPOTENCY_TABLE) == 1
    # the first claim also started the background purge, on a connection of its own
    wait_for(lambda: checked_out(db, app) == 0, 10, "every connection back in the pool")


@ALL_DATABASES
def test_create_tables_twice_makes_the_idempotency_table(
    app: Flask, db: SQLAlchemy, socketio: SocketIO
) -> None:
    """``create_tables()`` creates the table when missing and leaves it alone after;
    what the database has matches ``idempotency_table(MetaData())``: column names,
    nullability, primary key."""
    dbctx = DBContext(app, socketio, db)
    expected = socketio_dbctx.idempotency_table(sa.MetaData())
    assert expected.name == IDEMPOTENCY_TABLE
    assert {column.name for column in expected.columns} == {
        "namespace",
        "event",
        "key",
        "ack",
        "expires_at",
    }
    with app.app_context():
        dbctx.create_tables()
        dbctx.create_tables()
        inspector = sa.inspect(db.engine)
        assert inspector.has_table(IDEMPOTENCY_TABLE)
        columns = {column["name"]: column for column in inspector.get_columns(IDEMPOTENCY_TABLE)}
        primary_key = inspector.get_pk_constraint(IDEMPOTENCY_TABLE)["constrained_columns"]
    assert set(columns) == {column.name for column in expected.columns}
    assert {name: columns[name]["nullable"] for name in columns} == {
        column.name: column.nullable for column in expected.columns
    }
    assert columns["ack"]["nullable"] is True
    assert sorted(primary_key) == sorted(column.name for column in expected.primary_key)
    assert sorted(primary_key) == ["event", "key", "namespace"]
    assert checked_out(db, app) == 0
