"""Statement timeouts and idempotency keys through every way a handler is registered,
on each database, together with the rest of the pipeline.

The features' own tests drive them through one door each; these check that the
contract holds through all of them: ``@dbctx.on`` functions, ``DBContextNamespace``
methods and class attributes, ``DBCTX_WRAP_ALL_HANDLERS`` plain handlers, the catch-all
event; that the settings win in the documented order (handler decorator, then namespace
attribute, then ``DBCTX_STATEMENT_TIMEOUT``); that the server-side limit is really set
on each database and gone once the connection is back in the pool; and that a timed-out
or keyed event plays by the rules of held emits, ``after_commit``, retries and metrics.

Driven through Flask-SocketIO's test client (events run one at a time on this thread):
semantics only. Concurrency (two workers, async modes) is in
``tests/test_features_across_servers.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import sqlalchemy as sa
from conftest import ALL_DATABASES, checked_out, stored_names, wait_for
from eventkit import InProcess
from flask import Flask
from flask_socketio import Namespace, SocketIO, emit
from flask_sqlalchemy import SQLAlchemy

import socketio_dbctx
from socketio_dbctx import DBContext, DBContextNamespace, idempotent

NS = "/x"
TABLE = "socketio_dbctx_idempotency"
#: Far longer than any bound under test: a statement the bound does not cut runs this long.
LONG = 5.0
#: A cut statement must be answered within this (the bounds under test are 0.3 s).
CUT_BOUND = 3.0


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def app(app: Flask, database_url: str) -> Flask:  # database_url: for pytest<8's closure
    """conftest's app with a pool of one idle connection: each event after the first
    gets the connection the one before it used, so what an event leaves on it shows."""
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        "pool_size": 1,
        "max_overflow": 4,
        "pool_timeout": 5,
    }
    return app


@pytest.fixture
def dbctx_factory(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> Callable[..., DBContext]:
    """``dbctx_factory(**config)``: set ``DBCTX_`` keys, then make the extension."""

    def make(**config: Any) -> DBContext:
        app.config.update({f"DBCTX_{key.upper()}": value for key, value in config.items()})
        return DBContext(app, socketio, db, retry_delay=0)

    return make


_TEST_CLIENTS = InProcess(NS)
call = _TEST_CLIENTS.call
client_of = _TEST_CLIENTS.client_of


def received(client: Any, namespace: str = NS) -> list[tuple[str, list[Any]]]:
    """``(event, args)`` of every emit the client got since the last look."""
    return [(packet["name"], packet["args"]) for packet in client.get_received(namespace)]


def dialect(db: SQLAlchemy, app: Flask) -> str:
    with app.app_context():
        return str(db.engine.dialect.name)


def slow_sql(name: str, seconds: float = LONG) -> str:
    """A statement that runs about ``seconds`` on database ``name``."""
    if name == "postgresql":
        return f"SELECT pg_sleep({seconds})"
    if name in ("mysql", "mariadb"):
        return f"SELECT SLEEP({seconds})"
    # SQLite has no sleep: count (about 10 M rows a second here)
    rows = int(seconds * 10_000_000)
    return (
        f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) "
        "SELECT count(*) FROM c"
    )


def connection_id(name: str) -> str:
    if name == "postgresql":
        return "SELECT pg_backend_pid()"
    return "SELECT CONNECTION_ID()"


def limit_sql(name: str) -> str:
    """The server-side per-statement limit of this connection, as the server reports it."""
    if name == "postgresql":
        return "SHOW statement_timeout"
    return "SELECT @@max_statement_time"


def assert_error(ack: Any, code: str, retryable: bool = False) -> None:
    """``ack`` is the contract's error payload for ``code``."""
    assert isinstance(ack, dict), ack
    assert set(ack) == {"error", "message", "retryable"}, ack
    assert ack["error"] == code and ack["retryable"] is retryable, ack
    assert isinstance(ack["message"], str) and ack["message"], ack


def stored_keys(url: str) -> list[tuple[str, str, str, Any]]:
    """``(namespace, event, key, ack)`` of every stored key, over a fresh connection;
    ``ack`` decoded from its JSON text."""
    table = socketio_dbctx.idempotency_table(sa.MetaData())
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(table.c.namespace, table.c.event, table.c.key, table.c.ack)
            ).all()
    finally:
        engine.dispose()
    return sorted(
        (ns, event, str(key), None if ack is None else json.loads(ack))
        for ns, event, key, ack in rows
    )


def expire_all_keys(url: str) -> int:
    """Move every stored key's ``expires_at`` a day into the past; the count."""
    table = socketio_dbctx.idempotency_table(sa.MetaData())
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            past = conn.execute(sa.select(table.c.expires_at)).scalars().first()
            assert past is not None, "no key stored"
            if isinstance(past, (int, float)):  # epoch seconds
                when: Any = time.time() - 86400
            else:  # a datetime; naive or aware as the column stores it
                when = past.replace(year=past.year - 1)
            return int(conn.execute(table.update().values(expires_at=when)).rowcount)
    finally:
        engine.dispose()


@pytest.fixture
def keyed(app: Flask, db: SQLAlchemy, Item: Any) -> Iterator[None]:
    """``Item``'s table (the key table: :func:`create_tables`, once the test has its
    ``dbctx``); at the end, every connection back in the pool."""
    yield
    # the background purge a keyed event starts may hold a connection for a moment
    wait_for(lambda: checked_out(db, app) == 0, 5, "every connection back in the pool")


def create_tables(dbctx: DBContext, app: Flask) -> None:
    with app.app_context():
        dbctx.create_tables()


# -- statement timeouts: where the bound comes from ----------------------------------


@ALL_DATABASES
def test_a_function_handler_is_cut_by_the_configured_timeout(
    app, db, socketio, dbctx_factory, Item, url
):
    """``DBCTX_STATEMENT_TIMEOUT`` bounds a ``@dbctx.on`` function on each database
    (PostgreSQL and MariaDB on the server, SQLite by the watchdog): the slow statement
    is cut well before it would end, the ack is ``timeout``, the handler ran once (not
    retried, ``@idempotent`` or not), its insert and its held emit are dropped, its
    ``after_commit`` callback never runs, and the pool is whole."""
    dbctx = dbctx_factory(statement_timeout=0.3)
    name = dialect(db, app)
    runs: list[str] = []
    callbacks: list[str] = []

    @dbctx.on("slow", namespace=NS)
    @idempotent
    def slow(token: str) -> str:
        runs.append(token)
        db.session.add(Item(name=token))
        db.session.flush()
        emit("announce", token)
        dbctx.after_commit(callbacks.append, token)
        db.session.execute(sa.text(slow_sql(name)))
        return "finished"

    @dbctx.on("count", namespace=NS)
    def count() -> int:
        return int(db.session.execute(sa.select(sa.func.count()).select_from(Item)).scalar_one())

    client = client_of(socketio, app)
    started = time.monotonic()
    ack = call(client, "slow", "t1")
    elapsed = time.monotonic() - started

    assert_error(ack, "timeout")
    assert elapsed < CUT_BOUND, f"cut after {elapsed:.1f}s on {name}"
    assert runs == ["t1"]
    assert callbacks == []
    assert received(client) == []
    assert stored_names(url) == []
    stats = dbctx.metrics()[f"{NS}:slow"]
    assert stats["count"] == 1 and stats["errors"] == 1 and stats["retries"] == 0, stats
    assert checked_out(db, app) == 0
    # the pool serves the next event (on SQLite: the interrupted connection)
    assert call(client, "count") == 0
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("database_url", ["postgres", "mariadb"], indirect=True)
def test_the_limit_is_set_inside_events_and_gone_outside(
    app, db, socketio, dbctx_factory, Item, url
):
    """Inside an event the connection carries the event's limit (PostgreSQL ``SET
    LOCAL statement_timeout``, MariaDB ``max_statement_time``); on the very same
    connection, taken from the pool after the event, there is none (PostgreSQL: the
    transaction ended; MariaDB: reset to 0 when it went back to the pool). A handler
    with ``@statement_timeout(None)`` that gets that connection next sees none either."""
    dbctx = dbctx_factory(statement_timeout=0.3)
    name = dialect(db, app)

    def seen() -> tuple[int, str]:
        conn_id = int(db.session.execute(sa.text(connection_id(name))).scalar_one())
        return conn_id, str(db.session.execute(sa.text(limit_sql(name))).scalar_one())

    @dbctx.on("limited", namespace=NS)
    def limited() -> list[Any]:
        return list(seen())

    @dbctx.on("unlimited", namespace=NS)
    @socketio_dbctx.statement_timeout(None)
    def unlimited() -> list[Any]:
        return list(seen())

    client = client_of(socketio, app)
    inside_id, inside = call(client, "limited")
    with app.app_context(), db.engine.connect() as conn:
        outside_id = int(conn.execute(sa.text(connection_id(name))).scalar_one())
        outside = str(conn.execute(sa.text(limit_sql(name))).scalar_one())
    off_id, off = call(client, "unlimited")

    assert outside_id == inside_id == off_id, "the pool of one should reuse its connection"
    if name == "postgresql":
        assert (inside, outside, off) == ("300ms", "0", "0")
    else:
        assert float(inside) == pytest.approx(0.3)
        assert float(outside) == 0 and float(off) == 0, (inside, outside, off)
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_decorator_beats_attribute_beats_config(app, db, socketio, dbctx_factory, Item, url):
    """The bound of each handler, read back inside it (``SHOW statement_timeout``):
    the decorator wins over the namespace attribute, which wins over the config;
    ``@statement_timeout(None)`` turns the bound off whatever the others say; a
    namespace without the attribute, and a function handler, use the config."""
    dbctx = dbctx_factory(statement_timeout=5)

    def show() -> str:
        return str(db.session.execute(sa.text("SHOW statement_timeout")).scalar_one())

    class Tight(DBContextNamespace):
        statement_timeout = 0.25

        def on_attribute(self) -> str:
            return show()

        @socketio_dbctx.statement_timeout(2)
        def on_decorated(self) -> str:
            return show()

        @socketio_dbctx.statement_timeout(None)
        def on_off(self) -> str:
            return show()

    class Default(DBContextNamespace):
        def on_config(self) -> str:
            return show()

    @dbctx.on("function", namespace=NS)
    def function() -> str:
        return show()

    @dbctx.on("function_decorated", namespace=NS)
    @socketio_dbctx.statement_timeout(0.75)
    def function_decorated() -> str:
        return show()

    socketio.on_namespace(Tight("/tight"))
    socketio.on_namespace(Default("/default"))
    tight = client_of(socketio, app, "/tight")
    default = client_of(socketio, app, "/default")
    client = client_of(socketio, app)

    assert call(tight, "attribute", namespace="/tight") == "250ms"
    assert call(tight, "decorated", namespace="/tight") == "2s"
    assert call(tight, "off", namespace="/tight") == "0"
    assert call(default, "config", namespace="/default") == "5s"
    assert call(client, "function") == "5s"
    assert call(client, "function_decorated") == "750ms"
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_namespace_attribute_and_the_decorator_cut_and_spare(
    app, db, socketio, dbctx_factory, Item, url
):
    """No config: the namespace's ``statement_timeout = 0.3`` cuts a 5 s statement;
    a method of the same class decorated ``@statement_timeout(None)`` or with a longer
    bound runs a 0.6 s statement to the end."""
    dbctx_factory()

    def sleep(seconds: float) -> str:
        db.session.execute(sa.text(slow_sql("postgresql", seconds)))
        return "done"

    class Bounded(DBContextNamespace):
        statement_timeout = 0.3

        def on_slow(self, seconds: float) -> str:
            return sleep(seconds)

        @socketio_dbctx.statement_timeout(None)
        def on_unbounded(self, seconds: float) -> str:
            return sleep(seconds)

        @socketio_dbctx.statement_timeout(3)
        def on_longer(self, seconds: float) -> str:
            return sleep(seconds)

    socketio.on_namespace(Bounded(NS))
    client = client_of(socketio, app)
    started = time.monotonic()
    assert_error(call(client, "slow", LONG), "timeout")
    assert time.monotonic() - started < CUT_BOUND
    assert call(client, "unbounded", 0.6) == "done"
    assert call(client, "longer", 0.6) == "done"
    assert call(client, "slow", 0.01) == "done"
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("database_url", ["postgres", "sqlite"], indirect=True)
def test_wrap_all_puts_plain_handlers_under_the_bound(app, db, socketio, Item, url):
    """``DBCTX_WRAP_ALL_HANDLERS``: a handler registered with plain ``@socketio.on``
    and a plain ``flask_socketio.Namespace`` method are bounded by
    ``DBCTX_STATEMENT_TIMEOUT`` like any other; the decorator works on them too."""
    app.config.update(DBCTX_WRAP_ALL_HANDLERS=True, DBCTX_STATEMENT_TIMEOUT=0.3)
    name = dialect(db, app)

    @socketio.on("slow", namespace=NS)
    def slow(token: str) -> str:
        db.session.add(Item(name=token))
        db.session.execute(sa.text(slow_sql(name)))
        return "finished"

    @socketio.on("spared", namespace=NS)
    @socketio_dbctx.statement_timeout(None)
    def spared(token: str) -> str:
        db.session.add(Item(name=token))
        db.session.execute(sa.text(slow_sql(name, 0.6)))
        return "finished"

    class Plain(Namespace):
        def on_slow(self, token: str) -> str:
            return slow(token)

    DBContext(app, socketio, db, retry_delay=0)
    socketio.on_namespace(Plain("/plain"))
    client = client_of(socketio, app)
    plain = client_of(socketio, app, "/plain")

    started = time.monotonic()
    assert_error(call(client, "slow", "a"), "timeout")
    assert_error(call(plain, "slow", "b", namespace="/plain"), "timeout")
    assert time.monotonic() - started < 2 * CUT_BOUND
    assert call(client, "spared", "c") == "finished"
    assert stored_names(url) == ["c"]
    assert checked_out(db, app) == 0


# -- idempotency keys: every door ------------------------------------------------------


@ALL_DATABASES
def test_a_keyed_function_handler_answers_repeats_from_the_store(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """``@dbctx.on`` over ``@idempotency_key``: the first run stores its work, its
    ack and its key in one transaction and sends its held emits (to the caller and to
    the room) and runs its ``after_commit`` callback; a repeat of the key, from the same
    client or another one, gets the same ack without running the handler, emitting or
    calling back. The stored row has the namespace, event, key and the ack as JSON."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    runs: list[str] = []
    callbacks: list[str] = []

    @dbctx.on("place", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda data: data.get("request_id"))
    def place(data: dict[str, Any]) -> dict[str, Any]:
        runs.append(data["name"])
        item = Item(name=data["name"])
        db.session.add(item)
        db.session.flush()
        emit("placed", data["name"])
        emit("news", data["name"], broadcast=True, include_self=False)
        dbctx.after_commit(callbacks.append, data["name"])
        return {"id": item.id, "name": data["name"]}

    first_client = client_of(socketio, app)
    other_client = client_of(socketio, app)
    request = {"request_id": "r-1", "name": "apple"}

    first = call(first_client, "place", request)
    assert first == {"id": 1, "name": "apple"}
    assert received(first_client) == [("placed", ["apple"])]
    assert received(other_client) == [("news", ["apple"])]
    assert callbacks == ["apple"]

    # a repeat: same client, then another client; the name changed (the key decides)
    assert call(first_client, "place", {"request_id": "r-1", "name": "banana"}) == first
    assert call(other_client, "place", request) == first
    assert runs == ["apple"]
    assert callbacks == ["apple"]
    assert received(first_client) == [] and received(other_client) == []
    assert stored_names(url) == ["apple"]
    assert stored_keys(url) == [(NS, "place", "r-1", first)]

    # no key: runs every time, stores no key
    assert call(first_client, "place", {"name": "cherry"})["name"] == "cherry"
    assert stored_names(url) == ["apple", "cherry"]
    assert len(stored_keys(url)) == 1


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_the_namespace_attribute_is_the_default_key(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """``idempotency_key = <function>`` on a ``DBContextNamespace`` (a plain lambda, as
    the contract spells it, and a ``staticmethod``) keys every event of the class that
    has no key of its own; a method's own ``@idempotency_key`` wins; the same key in
    another event, or in another namespace, is independent."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    runs: list[tuple[str, str]] = []

    def handler(event: str) -> Callable[..., Any]:
        def on_event(self: Any, data: dict[str, Any]) -> str:
            runs.append((self.namespace, event))
            db.session.add(Item(name=f"{self.namespace}:{event}:{len(runs)}"))
            return f"{self.namespace}:{event}:{len(runs)}"

        return on_event

    class ByLambda(DBContextNamespace):
        idempotency_key = lambda data: data.get("id")  # noqa: E731 (the documented form)
        on_add = handler("add")
        on_other = handler("other")

        @socketio_dbctx.idempotency_key(lambda data: data.get("own"))
        def on_own(self, data: dict[str, Any]) -> str:
            return handler("own")(self, data)

    class ByStatic(DBContextNamespace):
        idempotency_key = staticmethod(lambda data: data.get("id"))
        on_add = handler("add")

    socketio.on_namespace(ByLambda("/lam"))
    socketio.on_namespace(ByStatic("/sta"))
    lam = client_of(socketio, app, "/lam")
    sta = client_of(socketio, app, "/sta")

    first = call(lam, "add", {"id": "k"}, namespace="/lam")
    assert call(lam, "add", {"id": "k"}, namespace="/lam") == first
    other = call(lam, "other", {"id": "k"}, namespace="/lam")  # another event
    assert other != first
    static = call(sta, "add", {"id": "k"}, namespace="/sta")  # another namespace
    assert call(sta, "add", {"id": "k"}, namespace="/sta") == static
    # own key: "id" is not its key, so equal ids do not repeat; equal "own" does
    own = call(lam, "own", {"id": "k", "own": "o"}, namespace="/lam")
    assert call(lam, "own", {"id": "other", "own": "o"}, namespace="/lam") == own
    assert call(lam, "own", {"id": "k", "own": "p"}, namespace="/lam") != own

    assert runs == [
        ("/lam", "add"),
        ("/lam", "other"),
        ("/sta", "add"),
        ("/lam", "own"),
        ("/lam", "own"),
    ]
    assert [row[:3] for row in stored_keys(url)] == [
        ("/lam", "add", "k"),
        ("/lam", "other", "k"),
        ("/lam", "own", "o"),
        ("/lam", "own", "p"),
        ("/sta", "add", "k"),
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_key_function_gets_the_payload_as_the_handler_does(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """Several arguments: the key function receives them all, as the handler does (a
    catch-all handler's gets the event name first); the key answers its repeat."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    seen: list[Any] = []

    @dbctx.on("pair", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda name, request_id: request_id)
    def pair(name: str, request_id: str) -> str:
        seen.append((name, request_id))
        db.session.add(Item(name=name))
        return name

    @dbctx.on("*", namespace="/any")
    @socketio_dbctx.idempotency_key(lambda event, data: data["id"])
    def anything(event: str, data: dict[str, Any]) -> str:
        seen.append((event, data["id"]))
        db.session.add(Item(name=f"{event}-{data['id']}"))
        return f"{event}-{data['id']}"

    client = client_of(socketio, app)
    anyc = client_of(socketio, app, "/any")
    assert call(client, "pair", "a", "k1") == "a"
    assert call(client, "pair", "b", "k1") == "a"
    assert call(anyc, "hello", {"id": 5}, namespace="/any") == "hello-5"
    assert call(anyc, "hello", {"id": 5}, namespace="/any") == "hello-5"
    assert seen == [("a", "k1"), ("hello", 5)]
    assert stored_names(url) == ["a", "hello-5"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_catch_all_handler_keys_each_event_under_its_own_name(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """The contract: "a different event ... with the same key is independent". Through
    a catch-all (``@dbctx.on("*")``) ``hello`` and ``bye`` are different events: ``bye``
    with ``hello``'s key must run, not get ``hello``'s ack; each is stored under its own
    event name."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    seen: list[str] = []

    @dbctx.on("*", namespace="/any")
    @socketio_dbctx.idempotency_key(lambda event, data: data["id"])
    def anything(event: str, data: dict[str, Any]) -> str:
        seen.append(event)
        db.session.add(Item(name=event))
        return event

    anyc = client_of(socketio, app, "/any")
    assert call(anyc, "hello", {"id": 5}, namespace="/any") == "hello"
    bye = call(anyc, "bye", {"id": 5}, namespace="/any")
    assert bye == "bye", f"'bye' was answered with another event's ack: {bye!r}"
    assert seen == ["hello", "bye"]
    assert stored_names(url) == ["bye", "hello"]
    assert [row[:3] for row in stored_keys(url)] == [
        ("/any", "bye", "5"),
        ("/any", "hello", "5"),
    ]


def _raise(data: Any) -> Any:
    raise KeyError("request_id")


@pytest.mark.parametrize(
    ("payload", "key_func"),
    [
        ({"k": 1.5}, None),
        ({"k": True}, None),
        ({"k": False}, None),
        ({"k": [1]}, None),
        ({"k": {"a": 1}}, None),
        ({"k": ""}, None),
        ({"k": "x" * 256}, None),
        ({}, _raise),
    ],
    ids=["float", "true", "false", "list", "dict", "empty", "256-chars", "raises"],
)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_bad_key_is_an_invalid_request(
    app, db, socketio, dbctx_factory, Item, url, keyed, payload, key_func
):
    """A key that is not a non-empty str of at most 255 characters or an int, or a key
    function that raises: ``invalid_request``, the handler not run, nothing stored,
    the same through a namespace attribute as through the decorator."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    runs: list[Any] = []
    key = key_func or (lambda data: data.get("k"))

    @dbctx.on("keyed", namespace=NS)
    @socketio_dbctx.idempotency_key(key)
    def keyed_handler(data: dict[str, Any]) -> str:
        runs.append(data)
        db.session.add(Item(name="ran"))
        return "ran"

    class ByAttribute(DBContextNamespace):
        idempotency_key = staticmethod(key)

        def on_keyed(self, data: dict[str, Any]) -> str:
            return keyed_handler(data)

    socketio.on_namespace(ByAttribute("/attr"))
    client = client_of(socketio, app)
    attr = client_of(socketio, app, "/attr")
    assert_error(call(client, "keyed", payload), "invalid_request")
    assert_error(call(attr, "keyed", payload, namespace="/attr"), "invalid_request")
    assert runs == []
    assert stored_names(url) == []
    assert stored_keys(url) == []


@pytest.mark.parametrize("database_url", ["sqlite", "mariadb"], indirect=True)
@pytest.mark.parametrize("key", ["x" * 255, 0, -7, 2**40, "ключ"], ids=repr)
def test_good_keys_are_stored(app, db, socketio, dbctx_factory, Item, url, keyed, key):
    """255 characters, ints (0, negative, beyond 32 bits), non-ASCII text: each is a
    key, stored, and answers its repeat."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    runs: list[Any] = []

    @dbctx.on("keyed", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda data: data["k"])
    def keyed_handler(data: dict[str, Any]) -> int:
        runs.append(data)
        return len(runs)

    client = client_of(socketio, app)
    assert call(client, "keyed", {"k": key}) == 1
    assert call(client, "keyed", {"k": key}) == 1
    assert len(runs) == 1
    assert stored_keys(url) == [(NS, "keyed", str(key), 1)]


@ALL_DATABASES
def test_a_failed_or_timed_out_run_releases_its_key(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """A keyed handler that raises, and one cut by the statement timeout, release the
    key: nothing is stored for it, and the client's retry with the same key runs the
    handler (and this time succeeds and is stored)."""
    dbctx = dbctx_factory(statement_timeout=0.3)
    create_tables(dbctx, app)
    name = dialect(db, app)
    runs: list[str] = []

    @dbctx.on("flaky", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda data: data["id"])
    def flaky(data: dict[str, Any]) -> str:
        runs.append(data["how"])
        db.session.add(Item(name=f"{data['id']}-{len(runs)}"))
        db.session.flush()
        if data["how"] == "raise":
            raise RuntimeError("a bug")
        if data["how"] == "slow":
            db.session.execute(sa.text(slow_sql(name)))
        return f"ok-{len(runs)}"

    client = client_of(socketio, app)
    assert_error(call(client, "flaky", {"id": "a", "how": "raise"}), "internal_error")
    assert_error(call(client, "flaky", {"id": "b", "how": "slow"}), "timeout")
    assert stored_keys(url) == []
    assert call(client, "flaky", {"id": "a", "how": "ok"}) == "ok-3"
    assert call(client, "flaky", {"id": "b", "how": "ok"}) == "ok-4"
    assert call(client, "flaky", {"id": "b", "how": "raise"}) == "ok-4"  # stored now
    assert runs == ["raise", "slow", "ok", "ok"]
    assert stored_names(url) == ["a-3", "b-4"]
    assert [row[2:] for row in stored_keys(url)] == [("a", "ok-3"), ("b", "ok-4")]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_wrap_all_plain_handlers_take_keys(app, db, socketio, Item, url, keyed):
    """``DBCTX_WRAP_ALL_HANDLERS``: ``@idempotency_key`` on a plain ``@socketio.on``
    handler works as on ``@dbctx.on``."""
    app.config["DBCTX_WRAP_ALL_HANDLERS"] = True
    runs: list[str] = []

    @socketio.on("add", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda name, request_id: request_id)
    def add(name: str, request_id: str) -> str:
        runs.append(name)
        db.session.add(Item(name=name))
        return name

    dbctx = DBContext(app, socketio, db, retry_delay=0)
    create_tables(dbctx, app)
    client = client_of(socketio, app)
    assert call(client, "add", "a", "r1") == "a"
    assert call(client, "add", "b", "r1") == "a"
    assert runs == ["a"]
    assert stored_names(url) == ["a"]


@pytest.mark.parametrize("database_url", ["postgres", "mariadb"], indirect=True)
def test_an_expired_key_runs_again_and_is_purged(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """``DBCTX_IDEMPOTENCY_TTL``: a key whose time is up runs the handler again (and
    is stored afresh); expired rows of other keys are purged by later keyed events,
    at most once per ``min(ttl, 60)`` s."""
    dbctx = dbctx_factory(idempotency_ttl=1)
    create_tables(dbctx, app)
    runs: list[str] = []

    @dbctx.on("add", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda key: key)
    def add(key: str) -> int:
        runs.append(key)
        return len(runs)

    client = client_of(socketio, app)
    assert call(client, "add", "old") == 1
    assert call(client, "add", "gone") == 2
    assert call(client, "add", "old") == 1
    assert expire_all_keys(url) == 2

    assert call(client, "add", "old") == 3  # expired: runs again
    assert call(client, "add", "old") == 3  # and is stored again

    # the purge: "gone" is expired; keyed events delete it within a purge period
    # (min(ttl, 60) = 1 s here), never a key that has not expired
    deadline = time.monotonic() + 10
    fresh = 0
    while any(row[2] == "gone" for row in stored_keys(url)):
        assert time.monotonic() < deadline, f"not purged: {stored_keys(url)}"
        fresh += 1
        call(client, "add", f"fresh-{fresh}")
        time.sleep(0.2)  # pacing only: the loop ends on the purge, not on time
    assert call(client, "add", "last") == len(runs)
    assert "last" in [row[2] for row in stored_keys(url)]  # unexpired: kept


# -- with retries and failures ---------------------------------------------------------


def lost_connection() -> Exception:
    """What SQLAlchemy raises when the connection broke under a statement."""
    return sa.exc.OperationalError(
        "SELECT 1", {}, Exception("connection lost"), connection_invalidated=True
    )


@pytest.mark.parametrize("database_url", ["postgres", "mariadb"], indirect=True)
def test_a_retried_attempt_is_bounded_and_claims_the_key_afresh(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """A keyed, bounded handler whose first attempt loses its connection is retried:
    the retry runs in a new transaction that carries the bound again, claims the key
    again (the first attempt's claim was rolled back with it), and is stored once; the
    repeat of the key is answered from the store."""
    dbctx = dbctx_factory(statement_timeout=0.3)
    create_tables(dbctx, app)
    name = dialect(db, app)
    limits: list[str] = []

    @dbctx.on("flaky", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda data: data["id"])
    def flaky(data: dict[str, Any]) -> dict[str, Any]:
        limits.append(str(db.session.execute(sa.text(limit_sql(name))).scalar_one()))
        db.session.add(Item(name=f"{data['id']}-{len(limits)}"))
        db.session.flush()
        if len(limits) == 1:
            raise lost_connection()
        return {"attempt": len(limits)}

    client = client_of(socketio, app)
    assert call(client, "flaky", {"id": "r"}) == {"attempt": 2}
    assert call(client, "flaky", {"id": "r"}) == {"attempt": 2}
    assert len(limits) == 2
    if name == "postgresql":
        assert limits == ["300ms", "300ms"]
    else:
        assert [float(limit) for limit in limits] == pytest.approx([0.3, 0.3])
    assert stored_names(url) == ["r-2"]
    assert stored_keys(url) == [(NS, "flaky", "r", {"attempt": 2})]
    assert dbctx.metrics()[f"{NS}:flaky"]["retries"] == 1


@ALL_DATABASES
def test_a_keyed_ack_that_is_not_json_fails_the_event_and_stores_nothing(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """The ack of a keyed handler must be JSON-serialisable: one that is not (a set)
    cannot be stored for the repeats, so the event fails (``internal_error``), its work
    is rolled back with the key, and a later request with the key runs again."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    runs: list[str] = []

    @dbctx.on("odd", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda data: data["id"])
    def odd(data: dict[str, Any]) -> Any:
        runs.append(data["ack"])
        db.session.add(Item(name=f"{data['id']}-{len(runs)}"))
        return {1, 2} if data["ack"] == "set" else [1, 2]

    client = client_of(socketio, app)
    assert_error(call(client, "odd", {"id": "k", "ack": "set"}), "internal_error")
    assert stored_names(url) == []
    assert stored_keys(url) == []
    assert call(client, "odd", {"id": "k", "ack": "list"}) == [1, 2]
    assert runs == ["set", "list"]
    assert stored_names(url) == ["k-2"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_every_bind_of_the_event_is_bounded(database_url, mariadb_url, Item):
    """An app with a second bind (``SQLALCHEMY_BINDS``, on MariaDB) next to its
    PostgreSQL default: an event's statements are bounded on whichever engine they
    run, and each engine's limit is gone once its connection is back in the pool."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SQLALCHEMY_BINDS={"other": mariadb_url},
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 2},
        DBCTX_STATEMENT_TIMEOUT=0.3,
    )
    db = SQLAlchemy(app)
    socketio = SocketIO(app, async_mode="threading")
    dbctx = DBContext(app, socketio, db, retry_delay=0)

    def on(bind: str | None, sql: str) -> Any:
        with app.app_context():
            engine = db.engines[bind]
        return db.session.execute(sa.text(sql), bind_arguments={"bind": engine}).scalar_one()

    @dbctx.on("slow_other", namespace=NS)
    def slow_other() -> Any:
        on(None, "SELECT 1")
        return on("other", slow_sql("mariadb"))

    @dbctx.on("slow_default", namespace=NS)
    def slow_default() -> Any:
        on("other", "SELECT 1")
        return on(None, slow_sql("postgresql"))

    client = client_of(socketio, app)
    try:
        for event in ("slow_other", "slow_default"):
            started = time.monotonic()
            assert_error(call(client, event), "timeout")
            assert time.monotonic() - started < CUT_BOUND, event
        with app.app_context():
            assert all(engine.pool.checkedout() == 0 for engine in db.engines.values())
            with db.engines["other"].connect() as conn:
                limit = conn.execute(sa.text("SELECT @@max_statement_time")).scalar_one()
                assert float(limit) == 0
    finally:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_keyed_handler_that_commits_itself_answers_its_repeats(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """``DBCTX_COMMIT_ON_SUCCESS = False``: the handler commits its own work (the
    documented way in that mode). A repeat of its key must get its ack, not ``busy``
    (which invites the client to retry for as long as the key lives)."""
    dbctx = dbctx_factory(commit_on_success=False)
    create_tables(dbctx, app)
    runs: list[str] = []

    @dbctx.on("add", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda data: data["id"])
    def add(data: dict[str, Any]) -> str:
        runs.append(data["name"])
        db.session.add(Item(name=data["name"]))
        db.session.commit()
        return data["name"]

    client = client_of(socketio, app)
    assert call(client, "add", {"id": "k", "name": "a"}) == "a"
    assert call(client, "add", {"id": "k", "name": "b"}) == "a"
    assert runs == ["a"]
    assert stored_keys(url) == [(NS, "add", "k", "a")]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_keyed_handler_that_commits_then_fails_releases_its_key(
    app, db, socketio, dbctx_factory, Item, url, keyed
):
    """The contract: "a failed run (handler raises) releases the key". A handler may
    commit part of its work itself (``db.session.commit()``); when it raises after that,
    the client's retry with the same key must run the handler again, not get ``busy``."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    runs: list[str] = []

    @dbctx.on("add", namespace=NS)
    @socketio_dbctx.idempotency_key(lambda data: data["id"])
    def add(data: dict[str, Any]) -> str:
        runs.append(data["name"])
        db.session.add(Item(name=data["name"]))
        db.session.commit()
        if data.get("fail"):
            raise RuntimeError("failed after its own commit")
        return data["name"]

    client = client_of(socketio, app)
    assert_error(call(client, "add", {"id": "k", "name": "a", "fail": True}), "internal_error")
    assert call(client, "add", {"id": "k", "name": "b"}) == "b"
    assert runs == ["a", "b"]
    assert stored_keys(url) == [(NS, "add", "k", "b")]


# -- the table -------------------------------------------------------------------------


@ALL_DATABASES
def test_create_tables_is_idempotent_and_matches_idempotency_table(app, db, dbctx_factory):
    """``dbctx.create_tables()`` makes the key table on the default engine, twice
    without harm; its columns and primary key are those of
    ``idempotency_table(metadata)`` (the ``Table`` Alembic users add to their
    metadata), which also works through ``metadata.create_all``."""
    dbctx = dbctx_factory()
    create_tables(dbctx, app)
    create_tables(dbctx, app)

    metadata = sa.MetaData()
    table = socketio_dbctx.idempotency_table(metadata)
    assert isinstance(table, sa.Table) and table.name == TABLE
    assert metadata.tables[TABLE] is table
    assert {c.name for c in table.columns} == {"namespace", "event", "key", "ack", "expires_at"}
    assert [c.name for c in table.primary_key.columns] == ["namespace", "event", "key"]
    assert table.c.ack.nullable

    with app.app_context():
        inspector = sa.inspect(db.engine)
        assert TABLE in inspector.get_table_names()
        columns = {c["name"] for c in inspector.get_columns(TABLE)}
        assert columns == {"namespace", "event", "key", "ack", "expires_at"}
        pk = inspector.get_pk_constraint(TABLE)["constrained_columns"]
        assert sorted(pk) == ["event", "key", "namespace"]
        metadata.create_all(db.engine)  # checkfirst: the Alembic-style path agrees
        with db.engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {TABLE}"))
        metadata.create_all(db.engine)  # and makes a table the library can use
    create_tables(dbctx, app)
    assert checked_out(db, app) == 0
