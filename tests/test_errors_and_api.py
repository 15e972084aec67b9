"""The exception tree, ``is_transient`` on real database failures, the handler
decorators, and the package's public names."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import checked_out, schema_url, stored_names
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

import socketio_dbctx
from socketio_dbctx import (
    BusyError,
    ContextSetupError,
    DatabaseUnavailableError,
    DBContext,
    DBContextNamespace,
    InvalidRequestError,
    RetryExhaustedError,
    WebSocketContextError,
    idempotent,
    is_transient,
    no_retry,
    retry_policy,
)

# -- exception tree ----------------------------------------------------------------------

ALL_ERRORS = [
    WebSocketContextError,
    ContextSetupError,
    InvalidRequestError,
    BusyError,
    DatabaseUnavailableError,
    RetryExhaustedError,
]

# (class, every class it must derive from); everything else in ALL_ERRORS it must not.
TREE = {
    WebSocketContextError: {Exception},
    ContextSetupError: {WebSocketContextError},
    InvalidRequestError: {WebSocketContextError, ValueError},
    BusyError: {WebSocketContextError},
    DatabaseUnavailableError: {WebSocketContextError, RuntimeError},
    RetryExhaustedError: {DatabaseUnavailableError, WebSocketContextError, RuntimeError},
}


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_exception_tree(cls):
    for parent in TREE[cls]:
        assert issubclass(cls, parent)
    for other in ALL_ERRORS:
        if other is not cls and other not in TREE[cls]:
            assert not issubclass(cls, other), f"{cls.__name__} must not derive {other.__name__}"
    for builtin in (ValueError, RuntimeError):
        if builtin not in TREE[cls]:
            assert not issubclass(cls, builtin)
    assert getattr(socketio_dbctx.errors, cls.__name__) is cls


def test_retry_exhausted_error_attributes():
    last = sa.exc.OperationalError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    error = RetryExhaustedError(3, last)
    assert error.attempts == 3
    assert error.last_exception is last
    assert isinstance(error, DatabaseUnavailableError)
    assert "3" in str(error)


def test_invalid_request_error_is_caught_as_value_error():
    with pytest.raises(ValueError, match="qty"):
        raise InvalidRequestError("qty must be > 0")


# -- is_transient on real failures -------------------------------------------------------


@pytest.fixture
def pg_engine(postgres_url: str, pg_schema: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(schema_url(postgres_url, pg_schema))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE acct (id int PRIMARY KEY, bal int NOT NULL)")
        conn.exec_driver_sql("INSERT INTO acct VALUES (1, 100), (2, 100)")
    yield engine
    engine.dispose()


def test_serialization_failure_is_transient(pg_engine):
    conn = pg_engine.connect().execution_options(isolation_level="SERIALIZABLE")
    try:
        conn.exec_driver_sql("SELECT bal FROM acct WHERE id = 1").scalar()  # takes the snapshot
        with pg_engine.begin() as other:
            other.exec_driver_sql("UPDATE acct SET bal = bal + 1 WHERE id = 1")
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.exec_driver_sql("UPDATE acct SET bal = bal - 1 WHERE id = 1")
    finally:
        conn.close()
    assert info.value.orig.pgcode == "40001"
    assert is_transient(info.value) is True


def test_deadlock_is_transient(pg_engine):
    a = pg_engine.connect()
    b = pg_engine.connect()
    errors: list[BaseException] = []
    try:
        a.exec_driver_sql("SET lock_timeout = '10s'")
        b.exec_driver_sql("SET deadlock_timeout = '50ms'")  # b detects it, so b is the victim
        b.exec_driver_sql("SET lock_timeout = '10s'")
        a.exec_driver_sql("UPDATE acct SET bal = 1 WHERE id = 1")
        b.exec_driver_sql("UPDATE acct SET bal = 1 WHERE id = 2")

        def a_second() -> None:
            try:
                a.exec_driver_sql("UPDATE acct SET bal = 2 WHERE id = 2")  # waits for b
            except Exception as exc:
                errors.append(exc)

        thread = threading.Thread(target=a_second)
        thread.start()
        time.sleep(0.2)  # let a block on b's row lock
        try:
            b.exec_driver_sql("UPDATE acct SET bal = 2 WHERE id = 1")  # waits for a: deadlock
        except Exception as exc:
            errors.append(exc)
            b.rollback()
        thread.join(15)
        assert not thread.is_alive()
    finally:
        a.close()
        b.close()
    assert len(errors) == 1
    assert isinstance(errors[0], sa.exc.DBAPIError)
    assert errors[0].orig.pgcode == "40P01"
    assert is_transient(errors[0]) is True


def test_terminated_backend_is_transient(pg_engine):
    victim = pg_engine.connect()
    pid = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with pg_engine.connect() as killer:
        # the second argument waits (ms) until the backend has really gone
        assert killer.execute(
            sa.text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid}
        ).scalar()
    with pytest.raises(sa.exc.OperationalError) as info:
        victim.exec_driver_sql("SELECT 1")
    victim.close()
    error = info.value
    assert error.connection_invalidated or error.orig.pgcode == "57P01"
    assert is_transient(error) is True


def test_connect_failure_is_transient():
    engine = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/x")
    try:
        with pytest.raises(sa.exc.OperationalError) as info:
            engine.connect()
    finally:
        engine.dispose()
    assert is_transient(info.value) is True


def test_unique_violation_is_not_transient(database_url):
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE u (id int PRIMARY KEY)")
            conn.exec_driver_sql("INSERT INTO u VALUES (1)")
        with pytest.raises(sa.exc.IntegrityError) as info, engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO u VALUES (1)")
    finally:
        engine.dispose()
    assert is_transient(info.value) is False


def test_statement_error_on_a_live_connection_is_not_transient(tmp_path):
    # SQLite reports a missing table as an OperationalError (with its statement)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    try:
        with pytest.raises(sa.exc.OperationalError) as info, engine.connect() as conn:
            conn.exec_driver_sql("SELECT * FROM no_such_table")
    finally:
        engine.dispose()
    assert is_transient(info.value) is False


def test_pool_timeout_is_not_transient(tmp_path):
    engine = sa.create_engine(
        f"sqlite:///{tmp_path}/x.db",
        poolclass=sa.pool.QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.1,
    )
    try:
        with engine.connect(), pytest.raises(sa.exc.TimeoutError) as info:
            engine.connect()
    finally:
        engine.dispose()
    assert is_transient(info.value) is False


class _DriverError(Exception):
    """A driver exception carrying a SQLSTATE, like psycopg2's (pgcode) or psycopg's."""

    def __init__(self, code: str, attr: str = "pgcode") -> None:
        super().__init__(f"SQLSTATE {code}")
        setattr(self, attr, code)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("40001", True),
        ("40P01", True),
        ("08000", True),
        ("08003", True),
        ("08006", True),
        ("08001", True),
        ("08007", False),
        ("57P01", True),
        ("57P02", True),
        ("57P03", True),
        ("57014", False),  # query_canceled
        ("23505", False),  # unique_violation
        ("42P01", False),  # undefined_table
        ("53300", False),  # too_many_connections
    ],
)
@pytest.mark.parametrize("attr", ["pgcode", "sqlstate"])
def test_is_transient_sqlstate_table(code, expected, attr):
    error = sa.exc.DBAPIError("COMMIT", {}, _DriverError(code, attr))
    assert is_transient(error) is expected


@pytest.mark.parametrize(
    "error",
    [
        ValueError("x"),
        RuntimeError("x"),
        BusyError("x"),
        InvalidRequestError("x"),
        sa.exc.TimeoutError("QueuePool limit reached"),
        sa.exc.IntegrityError("INSERT", {}, Exception("dup")),
        KeyError("x"),
    ],
    ids=repr,
)
def test_is_transient_false_for_everything_else(error):
    assert is_transient(error) is False


def test_is_transient_true_for_connection_invalidated():
    error = sa.exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert is_transient(error) is True


# -- decorators --------------------------------------------------------------------------


def test_decorators_return_the_same_function_and_stack():
    def handler(self, data):
        return data

    assert no_retry(handler) is handler
    assert idempotent(handler) is handler
    assert retry_policy(max_retries=1, retry_delay=0.1)(handler) is handler
    assert handler(None, 5) == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"max_retries": "2"},
        {"max_retries": True},
        {"retry_delay": -0.1},
        {"retry_delay": float("nan")},
        {"retry_delay": "0.1"},
    ],
    ids=repr,
)
def test_retry_policy_rejects_bad_values(kwargs):
    with pytest.raises(ContextSetupError):
        retry_policy(**kwargs)


def lost_connection() -> sa.exc.OperationalError:
    return sa.exc.OperationalError(
        "SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True
    )


sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
postgres_only = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def _decorated_namespace(decorate: Any, fail_times: int, calls: list[Any], db: Any, Item: Any):
    class Retrying(DBContextNamespace):
        @decorate
        def on_work(self, name):
            calls.append(self.db_session)
            self.db_session.add(Item(name=f"{name}{len(calls)}"))
            self.db_session.flush()
            if len(calls) <= fail_times:
                raise lost_connection()
            return {"ok": len(calls)}

    return Retrying("/r")


def _plain(func: Any) -> Any:
    return func


@sqlite_only
@pytest.mark.parametrize(
    ("decorate", "fail_times", "expected_calls", "expected_ack"),
    [
        (_plain, 99, 3, {"error": "db_unavailable", "retryable": True}),
        (_plain, 1, 2, {"ok": 2}),
        (no_retry, 99, 1, {"error": "db_unavailable", "retryable": False}),
        (no_retry, 1, 1, {"error": "db_unavailable", "retryable": False}),
        (idempotent, 99, 3, {"error": "db_unavailable", "retryable": True}),
        (retry_policy(max_retries=1), 99, 2, {"error": "db_unavailable", "retryable": True}),
        (retry_policy(max_retries=0), 99, 1, {"error": "db_unavailable", "retryable": False}),
        (retry_policy(max_retries=4, retry_delay=0), 3, 4, {"ok": 4}),
    ],
    ids=[
        "default-exhausted",
        "default-recovers",
        "no_retry",
        "no_retry-would-recover",
        "idempotent",
        "policy-1",
        "policy-0",
        "policy-4-recovers",
    ],
)
def test_decorators_shape_retries_of_a_handler(
    app, db, socketio, Item, decorate, fail_times, expected_calls, expected_ack
):
    dbctx = DBContext(app, socketio, db, max_retries=2, retry_delay=0)
    calls: list[Any] = []
    socketio.on_namespace(_decorated_namespace(decorate, fail_times, calls, db, Item))
    client = socketio.test_client(app, namespace="/r")
    ack = client.emit("work", "w", namespace="/r", callback=True)
    assert len(calls) == expected_calls
    assert len({id(s) for s in calls}) == expected_calls, "every attempt gets a fresh session"
    for key, value in expected_ack.items():
        assert ack[key] == value
    if "ok" in expected_ack:
        assert stored_names(app.config["SQLALCHEMY_DATABASE_URI"]) == [f"w{expected_calls}"]
    else:
        assert set(ack) == {"error", "message", "retryable"}
        assert stored_names(app.config["SQLALCHEMY_DATABASE_URI"]) == []
    metrics = dbctx.metrics()["/r:work"]
    assert metrics["count"] == 1
    assert metrics["retries"] == expected_calls - 1
    assert metrics["errors"] == (0 if "ok" in expected_ack else 1)
    assert checked_out(db, app) == 0


@postgres_only
@pytest.mark.parametrize("decorate", [_plain, idempotent], ids=["plain", "idempotent"])
def test_backend_killed_before_the_commit_answered_is_resolved_and_retried(
    app, db, socketio, Item, postgres_url, decorate
):
    """The backend dies between the flush and the COMMIT (from a ``before_commit``
    listener of the handler's session): its transaction is rolled back, which PostgreSQL
    tells (``txid_status``), so even a plain handler runs again, and is stored once."""
    DBContext(app, socketio, db, max_retries=2, retry_delay=0)
    killer = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    calls: list[int] = []

    def kill(pid: int) -> None:
        with killer.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid})

    class Orders(DBContextNamespace):
        @decorate
        def on_place(self, name):
            calls.append(1)
            self.db_session.add(Item(name=f"{name}{len(calls)}"))
            if len(calls) == 1:
                pid = (
                    self.db_session.connection()
                    .exec_driver_sql("SELECT pg_backend_pid()")
                    .scalar()
                )
                sa.event.listen(self.db_session, "before_commit", lambda session: kill(pid))
            return {"ok": len(calls)}

    socketio.on_namespace(Orders("/o"))
    client = socketio.test_client(app, namespace="/o")
    try:
        ack = client.emit("place", "p", namespace="/o", callback=True)
    finally:
        killer.dispose()
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    assert ack == {"ok": 2}
    assert len(calls) == 2
    assert stored_names(url) == ["p2"]
    assert checked_out(db, app) == 0


def test_pool_timeout_in_a_handler_acks_busy_and_is_not_retried(tmp_path):
    app = Flask("tight")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/tight.db",
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.1},
    )
    db = SQLAlchemy(app)
    socketio = SocketIO(app, async_mode="threading")
    DBContext(app, socketio, db, max_retries=2, retry_delay=0)
    calls = {"n": 0}

    class Chat(DBContextNamespace):
        def on_query(self):
            calls["n"] += 1
            return self.db_session.execute(sa.text("SELECT 1")).scalar()

    socketio.on_namespace(Chat("/c"))
    client = socketio.test_client(app, namespace="/c")
    with app.app_context():
        engine = db.engine
    held = engine.connect()  # the only pooled connection
    try:
        ack = client.emit("query", namespace="/c", callback=True)
    finally:
        held.close()
    assert ack["error"] == "busy"
    assert ack["retryable"] is True
    assert calls["n"] == 1
    assert client.emit("query", namespace="/c", callback=True) == 1
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_unreachable_database_is_retried_then_acks_db_unavailable():
    app = Flask("down")
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://postgres@127.0.0.1:1/x"
    db = SQLAlchemy(app)
    socketio = SocketIO(app, async_mode="threading")
    DBContext(app, socketio, db, max_retries=2, retry_delay=0)
    calls = {"n": 0}

    class Chat(DBContextNamespace):
        def on_query(self):
            calls["n"] += 1
            return self.db_session.execute(sa.text("SELECT 1")).scalar()

        @no_retry
        def on_query_once(self):
            calls["n"] += 1
            return self.db_session.execute(sa.text("SELECT 1")).scalar()

    socketio.on_namespace(Chat("/c"))
    client = socketio.test_client(app, namespace="/c")
    ack = client.emit("query", namespace="/c", callback=True)
    assert ack == {"error": "db_unavailable", "message": ack["message"], "retryable": True}
    assert calls["n"] == 3
    calls["n"] = 0
    ack = client.emit("query_once", namespace="/c", callback=True)
    assert ack == {"error": "db_unavailable", "message": ack["message"], "retryable": False}
    assert calls["n"] == 1
    with app.app_context():
        db.engine.dispose()


@sqlite_only
def test_serialization_failures_are_retried_even_for_plain_handlers(app, db, socketio, Item):
    """A 40001 at commit means the server rolled back: safe to retry without @idempotent."""
    DBContext(app, socketio, db, max_retries=2, retry_delay=0)
    calls: list[int] = []

    class Orders(DBContextNamespace):
        def on_place(self, name):
            calls.append(1)
            self.db_session.add(Item(name=f"{name}{len(calls)}"))
            if len(calls) == 1:

                def fail(session: Any) -> None:
                    raise sa.exc.OperationalError("COMMIT", {}, _DriverError("40001"))

                sa.event.listen(self.db_session, "before_commit", fail)
            return {"ok": len(calls)}

    socketio.on_namespace(Orders("/o"))
    client = socketio.test_client(app, namespace="/o")
    assert client.emit("place", "p", namespace="/o", callback=True) == {"ok": 2}
    assert len(calls) == 2
    assert stored_names(app.config["SQLALCHEMY_DATABASE_URI"]) == ["p2"]
    assert checked_out(db, app) == 0


# -- public names ------------------------------------------------------------------------

#: The names DESIGN section 3 documents for ``from socketio_dbctx import ...``.
DESIGN_NAMES = {
    "idempotency_table",
    "DBContext",
    "DBContextNamespace",
    "MonitorNamespace",
    "WebSocketContextHelper",
    "no_retry",
    "idempotent",
    "retry_policy",
    "is_transient",
    "WebSocketContextError",
    "ContextSetupError",
    "InvalidRequestError",
    "BusyError",
    "DatabaseUnavailableError",
    "RetryExhaustedError",
    "OutcomeUnknownError",
    "StatementTimeoutError",
    "statement_timeout",
    "idempotency_key",
}

#: Types of objects the API hands out (the middleware's ``event``, the periodic task
#: handle, the TypedDicts of the public return values, the namespace settings mixin)
#: and the version; exporting them is harmless.
ALLOWED_EXTRAS = {
    "ClusterPayload",
    "ErrorAck",
    "Event",
    "EventSummary",
    "FleetTotals",
    "HealthResult",
    "LeakEntry",
    "MonitorPayload",
    "NamespaceSettings",
    "PeriodicTask",
    "PoolStatus",
    "__version__",
    "immediate_emits",
}


def test_all_is_sorted_and_every_name_resolves():
    names = socketio_dbctx.__all__
    assert list(names) == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(socketio_dbctx, name) is not None


def test_all_matches_the_design():
    names = set(socketio_dbctx.__all__)
    missing = DESIGN_NAMES - names
    assert not missing, f"documented in DESIGN section 3 but not exported: {sorted(missing)}"
    assert names - DESIGN_NAMES <= ALLOWED_EXTRAS, sorted(names - DESIGN_NAMES - ALLOWED_EXTRAS)


def test_star_import_gives_exactly_all():
    namespace: dict[str, Any] = {}
    exec("from socketio_dbctx import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(socketio_dbctx.__all__)
