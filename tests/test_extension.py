"""DBContext, the Flask extension: registration, configuration, scopes, tasks, pools,
health and metrics."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ALL_DATABASES, POOL_KEYS, checked_out, make_item_model, stored_names
from flask import Flask, has_app_context
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import scoped_session, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool

from socketio_dbctx import ContextSetupError, DBContext, DBContextNamespace

PASSWORD = "Sup3rSecretPw"


# -- helpers -----------------------------------------------------------------------------


def sqlite_app(path: Any, name: str = "app", **engine_options: Any) -> Flask:
    app = Flask(name)
    app.config.update(SQLALCHEMY_DATABASE_URI=f"sqlite:///{path}/{name}.db")
    if engine_options:
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options
    return app


@pytest.fixture
def dbctx(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> DBContext:
    return DBContext(app, socketio, db)


# -- registration ------------------------------------------------------------------------


def test_init_app_pattern_registers_without_storing_the_app(app, db, socketio):
    dbctx = DBContext()
    assert "dbctx" not in app.extensions
    dbctx.init_app(app, socketio, db)
    assert app.extensions["dbctx"] is dbctx
    assert not hasattr(dbctx, "app")
    assert not any(isinstance(value, Flask) for value in vars(dbctx).values())


def lost_connection() -> sa.exc.OperationalError:
    return sa.exc.OperationalError(
        "SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True
    )


def probe(app: Flask, socketio: SocketIO) -> tuple[int, Any]:
    """Observe an app's effective settings: emit one event whose handler always loses
    its connection. Returns (attempts, ack); attempts = 1 + max_retries, and the ack
    has a "detail" key exactly when expose_errors is on."""
    calls = {"n": 0}

    class Probe(DBContextNamespace):
        def on_probe(self):
            calls["n"] += 1
            raise lost_connection()

    socketio.on_namespace(Probe("/probe"))
    client = socketio.test_client(app, namespace="/probe")
    ack = client.emit("probe", namespace="/probe", callback=True)
    return calls["n"], ack


def test_one_dbcontext_serves_two_apps_with_their_own_settings(tmp_path):
    dbctx = DBContext(expose_errors=True)
    apps, dbs, models, sios = [], [], [], []
    for name in ("one", "two"):
        app = sqlite_app(tmp_path, name)
        app.config["DBCTX_RETRY_DELAY"] = 0
        options: dict[str, Any] = {}
        if name == "one":
            app.config["DBCTX_MAX_RETRIES"] = 4
        else:
            options["max_retries"] = 0
        db = SQLAlchemy(app)
        model = make_item_model(db)
        with app.app_context():
            db.create_all()
        sio = SocketIO(app, async_mode="threading")
        dbctx.init_app(app, sio, db, **options)
        apps.append(app)
        dbs.append(db)
        models.append(model)
        sios.append(sio)
    try:
        one, two = apps
        assert one.extensions["dbctx"] is two.extensions["dbctx"] is dbctx
        attempts_one, ack_one = probe(one, sios[0])
        attempts_two, ack_two = probe(two, sios[1])
        assert (attempts_one, attempts_two) == (5, 1)
        assert "detail" in ack_one and "detail" in ack_two  # the shared constructor option
        # each app's scope writes to its own database
        for app, model, name in ((one, models[0], "in-one"), (two, models[1], "in-two")):
            with app.app_context(), dbctx.session_scope() as session:
                session.add(model(name=name))
        assert stored_names(one.config["SQLALCHEMY_DATABASE_URI"]) == ["in-one"]
        assert stored_names(two.config["SQLALCHEMY_DATABASE_URI"]) == ["in-two"]
        # outside any app context, with two apps, the app is ambiguous: a clear error
        with pytest.raises(ContextSetupError, match="app_context"), dbctx.session_scope():
            pass
        assert checked_out(dbs[0], one) == 0 and checked_out(dbs[1], two) == 0
    finally:
        for app, db in zip(apps, dbs):
            with app.app_context():
                db.engine.dispose()


@pytest.mark.parametrize("second", ["same_instance", "other_instance"])
def test_registering_twice_raises_runtime_error_that_says_what_to_do(app, db, socketio, second):
    app.config["DBCTX_RETRY_DELAY"] = 0
    first = DBContext(app, socketio, db, max_retries=1)
    other = first if second == "same_instance" else DBContext()
    with pytest.raises(RuntimeError) as info:
        other.init_app(app, socketio, db, max_retries=5)
    message = str(info.value)
    assert "init_app" in message or "app.extensions" in message
    assert app.extensions["dbctx"] is first
    assert probe(app, socketio)[0] == 2, "the first registration's settings still apply"


def test_unregistered_dbcontext_raises_context_setup_error():
    dbctx = DBContext()
    with pytest.raises(ContextSetupError, match="init_app"), dbctx.session_scope():
        pass


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "constructor", "init_app", "attempts", "detail"),
    [
        ({}, {}, {}, 3, False),
        ({"DBCTX_MAX_RETRIES": 1}, {}, {}, 2, False),
        ({"DBCTX_MAX_RETRIES": 1, "DBCTX_EXPOSE_ERRORS": True}, {"max_retries": 0}, {}, 1, True),
        ({"DBCTX_MAX_RETRIES": 1}, {"max_retries": 3}, {"max_retries": 0}, 1, False),
        ({}, {"expose_errors": True}, {}, 3, True),
        ({"DBCTX_EXPOSE_ERRORS": True}, {"expose_errors": False}, {}, 3, False),
        ({"DBCTX_EXPOSE_ERRORS": True}, {}, {"expose_errors": False}, 3, False),
    ],
    ids=[
        "defaults",
        "config-over-default",
        "option-over-config",
        "init_app-over-constructor",
        "option-over-default",
        "option-false-over-config",
        "init_app-false-over-config",
    ],
)
def test_config_precedence_defaults_then_app_config_then_options(
    app, db, socketio, config, constructor, init_app, attempts, detail
):
    app.config.update(config, DBCTX_RETRY_DELAY=0)
    dbctx = DBContext(**constructor)
    dbctx.init_app(app, socketio, db, **init_app)
    seen_attempts, ack = probe(app, socketio)
    assert seen_attempts == attempts
    assert ("detail" in ack) is detail
    assert ack["error"] == "db_unavailable"
    assert checked_out(db, app) == 0


INVALID_VALUES = [
    ("max_retries", -1),
    ("max_retries", 1.5),
    ("max_retries", True),
    ("max_retries", "3"),
    ("retry_delay", -0.01),
    ("retry_delay", float("nan")),
    ("retry_delay", False),
    ("retry_max_delay", float("inf")),
    ("max_in_flight_per_client", -1),
    ("max_concurrent_events", -5),
    ("max_concurrent_events", "10"),
    ("queue_timeout", "10"),
    ("queue_timeout", -1),
    ("leak_threshold", -0.5),
    ("leak_threshold", float("nan")),
    ("warn_utilization", 1.5),
    ("warn_utilization", -0.1),
    ("warn_utilization", True),
    ("monitor_namespace", "monitor"),
    ("monitor_namespace", 5),
    ("monitor_interval", 0),
    ("monitor_interval", -2),
    ("monitor_auth", ""),
    ("monitor_auth", 12345),
    ("commit_on_success", "yes"),
    ("commit_on_success", 1),
    ("expose_errors", "false"),
    ("cluster_redis_url", 6379),
]


@pytest.mark.parametrize("where", ["app_config", "option"])
@pytest.mark.parametrize(("name", "value"), INVALID_VALUES)
def test_invalid_config_value_raises_naming_the_key(app, db, name, value, where):
    key = "DBCTX_" + name.upper()
    dbctx = DBContext()
    with pytest.raises(ContextSetupError) as info:
        if where == "app_config":
            app.config[key] = value
            dbctx.init_app(app, db=db)
        else:
            dbctx.init_app(app, db=db, **{name: value})
    assert key in str(info.value)
    assert "dbctx" not in app.extensions, "a failed init_app must not register anything"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_retries", 0),
        ("retry_delay", 0),
        ("retry_max_delay", 0.0),
        ("max_in_flight_per_client", 0),
        ("max_concurrent_events", 0),
        ("max_concurrent_events", None),
        ("queue_timeout", 0),
        ("leak_threshold", 0),
        ("warn_utilization", 1.0),
        ("warn_utilization", 0),
        ("monitor_namespace", "/ops"),
        ("monitor_interval", 0.5),
        ("monitor_auth", False),
        ("monitor_auth", "token"),
        ("monitor_auth", lambda auth: True),
        ("commit_on_success", False),
        ("expose_errors", True),
        ("cluster_redis_url", "redis://127.0.0.1:6379/0"),
    ],
)
def test_valid_edge_values_are_accepted(app, db, name, value):
    app.config["DBCTX_" + name.upper()] = value
    dbctx = DBContext(app, db=db)
    assert app.extensions["dbctx"] is dbctx


def test_unknown_option_name_raises_naming_it(app, db):
    with pytest.raises(ContextSetupError, match="max_retrys"):
        DBContext(app, db=db, max_retrys=1)
    assert "dbctx" not in app.extensions


@pytest.mark.parametrize("where", ["constructor", "init_app"])
def test_db_and_session_factory_together_are_rejected(app, db, where):
    engine = sa.create_engine("sqlite://")
    factory = sessionmaker(bind=engine)
    with pytest.raises(ContextSetupError, match="session_factory"):
        if where == "constructor":
            DBContext(app, db=db, session_factory=factory)
        else:
            DBContext().init_app(app, db=db, session_factory=factory)
    assert "dbctx" not in app.extensions
    engine.dispose()


@pytest.mark.parametrize(
    "factory",
    [lambda: None, "sqlite://", object(), sa.create_engine],
    ids=["lambda", "str", "object", "function"],
)
def test_session_factory_must_be_a_sessionmaker(app, factory):
    with pytest.raises(ContextSetupError, match="session_factory"):
        DBContext(app, session_factory=factory)
    assert "dbctx" not in app.extensions


# -- session_scope / run_in_context ------------------------------------------------------


@ALL_DATABASES
def test_session_scope_commits(app, db, dbctx, Item, url):
    with dbctx.session_scope() as session:
        assert session is db.session()
        assert has_app_context()
        session.add(Item(name="scoped"))
    assert stored_names(url) == ["scoped"]
    assert checked_out(db, app) == 0


@ALL_DATABASES
def test_session_scope_rolls_back_and_reraises(app, db, dbctx, Item, url):
    error = RuntimeError("handler failed")
    with pytest.raises(RuntimeError) as info, dbctx.session_scope() as session:
        session.add(Item(name="doomed"))
        session.flush()
        raise error
    assert info.value is error
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


def test_session_scope_inside_an_outer_app_context_is_fresh(app, db, dbctx, Item, url):
    with app.app_context():
        outer = db.session()
        outer.execute(sa.select(Item)).all()  # the outer session holds a connection
        for name in ("a", "b"):
            with dbctx.session_scope() as session:
                assert session is not outer
                assert db.session() is session
                session.add(Item(name=name))
            assert checked_out(db, app) == 1  # only the outer session's connection
        assert db.session() is outer
    assert stored_names(url) == ["a", "b"]
    assert checked_out(db, app) == 0


def test_run_in_context(app, db, dbctx, Item, url):
    def work(name: str, *, suffix: str) -> str:
        db.session.add(Item(name=name + suffix))
        return "done:" + name

    assert dbctx.run_in_context(work, "x", suffix="-1") == "done:x"
    with pytest.raises(ZeroDivisionError):
        dbctx.run_in_context(lambda: (db.session.add(Item(name="no")), 1 / 0))
    assert stored_names(url) == ["x-1"]
    assert checked_out(db, app) == 0


# -- background and periodic tasks -------------------------------------------------------


@pytest.mark.parametrize("with_socketio", [True, False], ids=["socketio", "no_socketio"])
def test_start_background_task(app, db, Item, url, caplog, with_socketio):
    socketio = SocketIO(app, async_mode="threading") if with_socketio else None
    dbctx = DBContext(app, socketio, db)
    done = threading.Event()
    sessions: list[Any] = []

    def write(name: str) -> None:
        sessions.append(db.session())
        db.session.add(Item(name=name))
        done.set()

    handle = dbctx.start_background_task(write, "from-task")
    assert done.wait(5)
    handle.join(5)
    assert stored_names(url) == ["from-task"]
    assert checked_out(db, app) == 0

    failed = threading.Event()

    def fail() -> None:
        db.session.add(Item(name="never"))
        db.session.flush()
        failed.set()
        raise RuntimeError("task exploded")

    with caplog.at_level(logging.ERROR, logger="socketio_dbctx"):
        handle = dbctx.start_background_task(fail)
        assert failed.wait(5)
        handle.join(5)
    assert any(
        r.exc_info and isinstance(r.exc_info[1], RuntimeError) and "exploded" in str(r.exc_info[1])
        for r in caplog.records
    )
    # nothing stored, nothing held, and the next task still runs
    assert stored_names(url) == ["from-task"]
    assert checked_out(db, app) == 0
    done.clear()
    dbctx.start_background_task(write, "after-failure").join(5)
    assert done.is_set()
    assert stored_names(url) == ["after-failure", "from-task"]
    assert sessions[0] is not sessions[1]
    assert checked_out(db, app) == 0


def test_start_periodic_task_runs_each_time_in_its_own_scope(
    app, db, socketio, dbctx, Item, url, caplog
):
    sessions: list[Any] = []
    out_at_start: list[int] = []
    enough = threading.Event()

    def tick(prefix: str, *, every: int) -> None:
        assert (prefix, every) == ("run", 1)
        out_at_start.append(db.engine.pool.checkedout())
        sessions.append(db.session())
        n = len(sessions)
        db.session.add(Item(name=f"{prefix}{n}"))
        db.session.flush()
        if n == 2:
            raise RuntimeError("second run fails")
        if n >= 5:
            enough.set()

    with caplog.at_level(logging.ERROR, logger="socketio_dbctx"):
        task = dbctx.start_periodic_task(tick, 0.02, "run", every=1)
        try:
            assert enough.wait(5)
        finally:
            task.stop()
    time.sleep(0.1)  # a run in progress when stop() was called may still finish
    runs = len(sessions)
    time.sleep(0.2)
    assert len(sessions) == runs, "stop() must end the loop"
    assert runs >= 5
    assert len({id(s) for s in sessions}) == runs  # all alive: ids are distinct objects
    assert out_at_start == [0] * runs, "no connection may be held between runs"
    names = stored_names(url)
    assert "run2" not in names
    assert {"run1", "run3", "run4", "run5"} <= set(names)
    assert any("second run fails" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert checked_out(db, app) == 0


@pytest.mark.parametrize(
    ("func", "interval"),
    [
        (None, 1.0),
        ("not callable", 1.0),
        (print, 0),
        (print, -1),
        (print, float("nan")),
        (print, "1"),
        (print, None),
        (print, True),
    ],
)
def test_start_periodic_task_rejects_bad_arguments(app, db, dbctx, func, interval):
    before = threading.active_count()
    with pytest.raises(ValueError):
        dbctx.start_periodic_task(func, interval)
    assert threading.active_count() == before, "no task may be started"


# -- pool status -------------------------------------------------------------------------


@ALL_DATABASES
def test_pool_status_shape_for_queue_pool(app, db, dbctx):
    status = dbctx.pool_status()
    assert set(status) == POOL_KEYS
    assert status["bind"] == "default"
    assert status["pool_class"] == "QueuePool"
    assert status["size"] == 5
    assert status["max_overflow"] == 2
    assert status["capacity"] == 7
    assert status["checked_out"] == 0
    assert status["overflow"] == 0  # SQLAlchemy reports -5 here; clamped
    assert status["utilization"] == 0.0
    assert status["timeout"] == 5.0
    assert status["waiting"] == 0
    assert status["long_held"] == 0
    assert status["status"] == "healthy"
    assert dbctx.pool_status("default") == status
    assert dbctx.pool_status_all() == {"default": status}
    json.dumps(status)  # plain JSON


@pytest.mark.parametrize(
    ("warn", "held", "expected_status", "expected_overflow"),
    [
        (None, 1, "healthy", 0),
        (None, 5, "healthy", 0),
        (None, 6, "warning", 1),
        (None, 7, "exhausted", 2),
        (0.5, 3, "healthy", 0),
        (0.5, 4, "warning", 0),
        (1.0, 6, "healthy", 1),
        (1.0, 7, "exhausted", 2),
    ],
)
def test_pool_status_utilization_and_status(
    app, db, warn, held, expected_status, expected_overflow
):
    if warn is not None:
        app.config["DBCTX_WARN_UTILIZATION"] = warn
    dbctx = DBContext(app, db=db)
    with app.app_context():
        engine = db.engine
    conns = [engine.connect() for _ in range(held)]
    try:
        status = dbctx.pool_status()
        assert status["checked_out"] == held
        assert status["utilization"] == pytest.approx(held / 7, abs=1e-4)
        assert status["overflow"] == expected_overflow
        assert status["status"] == expected_status
    finally:
        for conn in conns:
            conn.close()
    assert dbctx.pool_status()["checked_out"] == 0
    assert dbctx.pool_status()["status"] == "healthy"


def test_pool_status_unbounded_queue_pool(tmp_path):
    app = sqlite_app(tmp_path, pool_size=2, max_overflow=-1)
    db = SQLAlchemy(app)
    dbctx = DBContext(app, db=db)
    with app.app_context():
        engine = db.engine
    conns = [engine.connect() for _ in range(3)]
    try:
        status = dbctx.pool_status()
        assert status["capacity"] is None
        assert status["utilization"] == 0.0
        assert status["checked_out"] == 3
        assert status["status"] == "healthy"
    finally:
        for conn in conns:
            conn.close()
        engine.dispose()


@pytest.mark.parametrize("poolclass", [NullPool, SingletonThreadPool], ids=lambda c: c.__name__)
@pytest.mark.parametrize("first_status_before_checkout", [True, False])
def test_pool_status_unbounded_pools(tmp_path, poolclass, first_status_before_checkout):
    """Pools that don't count their connections: the tracker does, capacity is null."""
    app = sqlite_app(tmp_path, poolclass=poolclass)
    db = SQLAlchemy(app)
    dbctx = DBContext(app, db=db)
    with app.app_context():
        engine = db.engine
    if first_status_before_checkout:
        dbctx.pool_status()
    conn = engine.connect()
    try:
        status = dbctx.pool_status()
        assert set(status) == POOL_KEYS
        assert status["pool_class"] == poolclass.__name__
        assert status["capacity"] is None
        assert status["utilization"] == 0.0
        assert status["checked_out"] == 1
        assert status["status"] == "healthy"
    finally:
        conn.close()
    assert dbctx.pool_status()["checked_out"] == 0
    engine.dispose()


def test_pool_status_null_pool_counts_a_scope_opened_before_anyone_asked(tmp_path):
    """An event (here: a scope) holding a connection before the first pool_status call."""
    app = sqlite_app(tmp_path, poolclass=NullPool)
    db = SQLAlchemy(app)
    dbctx = DBContext(app, db=db)
    with dbctx.session_scope() as session:
        session.execute(sa.text("SELECT 1"))  # holds a connection until the scope ends
        assert dbctx.pool_status()["checked_out"] == 1
    assert dbctx.pool_status()["checked_out"] == 0
    with app.app_context():
        db.engine.dispose()


def test_pool_status_static_pool_is_unknown(tmp_path):
    app = Flask("static")
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"  # Flask-SQLAlchemy: StaticPool
    db = SQLAlchemy(app)
    dbctx = DBContext(app, db=db)
    with app.app_context():
        assert isinstance(db.engine.pool, StaticPool)
    status = dbctx.pool_status()
    assert set(status) == POOL_KEYS
    assert status["pool_class"] == "StaticPool"
    assert status["status"] == "unknown"


def test_pool_status_binds_appear_by_name(tmp_path):
    app = sqlite_app(tmp_path)
    app.config["SQLALCHEMY_BINDS"] = {
        "reports": {"url": f"sqlite:///{tmp_path}/reports.db", "poolclass": NullPool},
        "audit": f"sqlite:///{tmp_path}/audit.db",
    }
    db = SQLAlchemy(app)
    dbctx = DBContext(app, db=db)
    statuses = dbctx.pool_status_all()
    assert set(statuses) == {"default", "reports", "audit"}
    for name, status in statuses.items():
        assert set(status) == POOL_KEYS
        assert status["bind"] == name
    assert statuses["reports"]["pool_class"] == "NullPool"
    assert dbctx.pool_status("reports") == statuses["reports"]
    with pytest.raises(KeyError, match="nope"):
        dbctx.pool_status("nope")
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


@ALL_DATABASES
def test_pool_status_with_plain_session_factory(database_url):
    app = Flask("plain")
    engine = sa.create_engine(database_url, pool_size=3, max_overflow=1)
    dbctx = DBContext(app, session_factory=scoped_session(sessionmaker(bind=engine)))
    conn = engine.connect()
    try:
        status = dbctx.pool_status()
        assert status["pool_class"] == "QueuePool"
        assert status["capacity"] == 4
        assert status["checked_out"] == 1
        assert status["utilization"] == 0.25
    finally:
        conn.close()
        engine.dispose()


def test_pool_dicts_never_contain_password_or_url(postgres_url, tmp_path):
    # PostgreSQL here trusts local connections, so the password is accepted and ignored.
    url = sa.make_url(postgres_url).set(password=PASSWORD)
    app = Flask("secret")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url.render_as_string(hide_password=False),
        SQLALCHEMY_BINDS={"other": url.render_as_string(hide_password=False)},
    )
    db = SQLAlchemy(app)
    dbctx = DBContext(app, db=db)
    with app.app_context():
        engine = db.engine
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            text = json.dumps(dbctx.pool_status_all()) + repr(dbctx.pool_status_all())
        assert PASSWORD not in text
        assert "postgresql" not in text
        assert "127.0.0.1" not in text
        assert str(url.database) not in text.replace('"default"', "")
        health = dbctx.health_check()
        assert health["healthy"] is True
        assert PASSWORD not in json.dumps(health)
    finally:
        with app.app_context():
            for e in db.engines.values():
                e.dispose()


# -- health check ------------------------------------------------------------------------


@ALL_DATABASES
def test_health_check_healthy(app, db, dbctx):
    result = dbctx.health_check()
    assert set(result) == {"healthy", "latency_ms", "error"}
    assert result["healthy"] is True
    assert result["error"] is None
    assert isinstance(result["latency_ms"], float) and result["latency_ms"] >= 0
    assert checked_out(db, app) == 0


def test_health_check_unhealthy_for_a_closed_port():
    app = Flask("down")
    app.config["SQLALCHEMY_DATABASE_URI"] = (
        f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:1/x"
    )
    db = SQLAlchemy(app)
    dbctx = DBContext(app, db=db)
    start = time.monotonic()
    result = dbctx.health_check(timeout=2.0)
    elapsed = time.monotonic() - start
    assert result["healthy"] is False
    assert isinstance(result["error"], str) and result["error"]
    assert PASSWORD not in result["error"]
    assert isinstance(result["latency_ms"], float)
    assert elapsed < 3.0


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP port that accepts connections but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()  # resets the queued connections, so the stuck probe ends too


def test_health_check_is_bounded_in_time_when_the_server_hangs(black_hole):
    app = Flask("hang")
    app.config["SQLALCHEMY_DATABASE_URI"] = (
        f"postgresql+psycopg2://postgres@127.0.0.1:{black_hole}/x"
    )
    db = SQLAlchemy(app)
    dbctx = DBContext(app, db=db)
    start = time.monotonic()
    result = dbctx.health_check(timeout=0.5)
    elapsed = time.monotonic() - start
    assert result["healthy"] is False
    assert isinstance(result["error"], str) and result["error"]
    assert 0.4 <= elapsed < 1.5


def test_health_check_without_any_database_does_not_raise():
    dbctx = DBContext()
    result = dbctx.health_check()
    assert result["healthy"] is False
    assert result["error"]


# -- metrics -----------------------------------------------------------------------------


def test_metrics_count_events_and_errors(app, db, socketio, dbctx, Item):
    class Chat(DBContextNamespace):
        def on_ok(self, name):
            db.session.add(Item(name=name))
            return "ok"

        def on_bad(self):
            raise RuntimeError("nope")

    socketio.on_namespace(Chat("/m"))
    client = socketio.test_client(app, namespace="/m")
    for i in range(3):
        assert client.emit("ok", f"n{i}", namespace="/m", callback=True) == "ok"
    assert client.emit("bad", namespace="/m", callback=True)["error"] == "internal_error"
    assert client.emit("ok", namespace="/m", callback=True)["error"] == "invalid_request"
    metrics = dbctx.metrics()
    assert set(metrics) >= {"/m:ok", "/m:bad"}
    ok, bad = metrics["/m:ok"], metrics["/m:bad"]
    for entry in (ok, bad):
        assert {
            "count",
            "errors",
            "retries",
            "busy",
            "in_flight",
            "p50_ms",
            "p95_ms",
            "p99_ms",
        } <= set(entry)
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            assert isinstance(entry[key], float) and math.isfinite(entry[key])
            assert entry[key] >= 0
        assert entry["p50_ms"] <= entry["p95_ms"] <= entry["p99_ms"]
        assert entry["in_flight"] == 0
    assert ok["count"] == 4 and ok["errors"] == 1
    assert bad["count"] == 1 and bad["errors"] == 1
    json.dumps(metrics)


def test_pool_classes_are_what_the_tests_think(app, db):
    """Guard for the pool tests above: the fixture app uses a QueuePool."""
    with app.app_context():
        assert isinstance(db.engine.pool, QueuePool)


def test_every_new_database_gets_its_commits_even_when_ids_are_reused() -> None:
    """Each new Flask-SQLAlchemy instance's session maker is followed, even when its
    ``Session`` subclass reuses the ``id()`` of a collected one (SQLAlchemy's
    ``event.contains`` keys on ``id()`` and answered for the dead class: about 1 in 10
    such apps lost every commit of a ``session_scope``)."""
    import gc

    lost = []
    for number in range(150):
        app = Flask(f"reuse{number}")
        app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
        db = SQLAlchemy(app)

        class Row(db.Model):  # type: ignore[name-defined,misc]
            __tablename__ = "rows"
            id = sa.Column(sa.Integer, primary_key=True)

        with app.app_context():
            db.create_all()
        dbctx = DBContext(app, None, db)
        with dbctx.session_scope() as session:
            session.add(Row())
        with app.app_context():
            if db.session.scalar(sa.select(sa.func.count()).select_from(Row)) != 1:
                lost.append(number)
        del app, db, dbctx, Row
        gc.collect()
    assert lost == []
