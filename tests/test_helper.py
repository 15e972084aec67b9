"""WebSocketContextHelper: the seed's asyncio API.

There is no pytest-asyncio here; each test drives its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import POOL_KEYS, checked_out, stored_names
from flask import Flask, has_app_context
from flask.globals import app_ctx
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import (
    ContextSetupError,
    DBContext,
    RetryExhaustedError,
    WebSocketContextHelper,
)

postgres_only = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def registry_is_empty(db: SQLAlchemy) -> bool:
    """No session is left in Flask-SQLAlchemy's scoped-session registry."""
    return not db.session.registry.registry


@pytest.fixture(params=["db_argument", "app_only", "with_dbcontext"])
def helper(request: pytest.FixtureRequest, app: Flask, db: SQLAlchemy) -> WebSocketContextHelper:
    """The helper, made each documented way."""
    if request.param == "db_argument":
        return WebSocketContextHelper(app, db)
    if request.param == "with_dbcontext":
        DBContext(app, db=db)
    return WebSocketContextHelper(app)


# -- where and how the work runs ---------------------------------------------------------


def test_coroutine_function_runs_on_the_loop_in_its_own_context(helper, app, db, Item, url):
    seen: dict[str, Any] = {}

    async def work(name: str, *, extra: str) -> str:
        seen["thread"] = threading.get_ident()
        seen["ctx"] = app_ctx._get_current_object()
        seen["session"] = db.session()
        db.session.add(Item(name=name + extra))
        await asyncio.sleep(0)
        return "done"

    async def main() -> tuple[Any, int]:
        loop_thread = threading.get_ident()
        return await helper.execute_with_db_context(work, "co", extra="-1"), loop_thread

    with app.app_context() as outer:
        outer_session = db.session()
        result, loop_thread = asyncio.run(main())
        assert db.session() is outer_session
    assert result == "done"
    assert seen["thread"] == loop_thread
    assert seen["ctx"] is not outer
    assert seen["session"] is not outer_session
    assert stored_names(url) == ["co-1"]
    assert checked_out(db, app) == 0
    assert registry_is_empty(db)


class AsyncCallable:
    async def __call__(self, name: str) -> int:
        return threading.get_ident()


@pytest.mark.parametrize("kind", ["partial", "async_callable_object"])
def test_wrapped_coroutine_functions_run_on_the_loop(app, db, kind):
    helper = WebSocketContextHelper(app, db)

    async def work(name: str) -> int:
        assert db.session() is not None
        return threading.get_ident()

    func = (
        functools.partial(work, "x")
        if kind == "partial"
        else functools.partial(AsyncCallable(), "x")
    )

    async def main() -> tuple[int, int]:
        return await helper.execute_with_db_context(func), threading.get_ident()

    ran_on, loop_thread = asyncio.run(main())
    assert ran_on == loop_thread
    assert checked_out(db, app) == 0


def test_plain_function_runs_in_a_worker_thread_in_its_own_context(helper, app, db, Item, url):
    seen: dict[str, Any] = {}

    def work(name: str) -> str:
        seen["thread"] = threading.get_ident()
        seen["ctx"] = has_app_context()
        seen["session"] = db.session()
        db.session.add(Item(name=name))
        return "sync-done"

    async def main() -> tuple[Any, int]:
        return await helper.execute_with_db_context(work, "sync"), threading.get_ident()

    result, loop_thread = asyncio.run(main())
    assert result == "sync-done"
    assert seen["thread"] != loop_thread
    assert seen["ctx"] is True
    assert stored_names(url) == ["sync"]
    assert checked_out(db, app) == 0
    assert registry_is_empty(db)


@pytest.mark.parametrize("kind", ["coroutine", "plain"])
def test_error_rolls_back_and_propagates(helper, app, db, Item, url, kind):
    error = RuntimeError("work failed")

    def sync_work() -> None:
        db.session.add(Item(name="doomed"))
        db.session.flush()
        raise error

    async def async_work() -> None:
        sync_work()

    func = async_work if kind == "coroutine" else sync_work
    with pytest.raises(RuntimeError) as info:
        asyncio.run(helper.execute_with_db_context(func))
    assert info.value is error
    assert stored_names(url) == []
    assert checked_out(db, app) == 0
    assert registry_is_empty(db)


def test_message_context_yields_a_fresh_committed_session(helper, app, db, Item, url):
    async def main() -> None:
        sessions = []
        for name in ("m1", "m2"):
            async with helper.message_context() as session:
                assert session is db.session()
                sessions.append(session)
                session.add(Item(name=name))
                await asyncio.sleep(0)
        assert sessions[0] is not sessions[1]
        with pytest.raises(KeyError):
            async with helper.message_context() as session:
                session.add(Item(name="doomed"))
                session.flush()
                raise KeyError("nope")

    asyncio.run(main())
    assert stored_names(url) == ["m1", "m2"]
    assert checked_out(db, app) == 0
    assert registry_is_empty(db)


def test_async_with_helper(app, db, Item, url):
    async def main() -> None:
        async with WebSocketContextHelper(app) as helper:
            assert isinstance(helper, WebSocketContextHelper)
            await helper.execute_with_db_context(lambda: db.session.add(Item(name="aw")))

    asyncio.run(main())
    assert stored_names(url) == ["aw"]
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("kind", ["coroutine", "plain"])
def test_concurrent_calls_each_get_their_own_session(helper, app, db, Item, url, kind):
    n = 20
    sessions: list[Any] = []  # kept alive, so identities cannot be reused
    active = {"now": 0, "max": 0}
    lock = threading.Lock()

    def enter() -> None:
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])

    def leave() -> None:
        with lock:
            active["now"] -= 1

    async def async_work(i: int) -> int:
        enter()
        sessions.append(db.session())
        await asyncio.sleep(0.02)  # every scope is open at the same time here
        db.session.add(Item(name=f"c{i:02d}"))  # no await after this: no connection held
        leave()
        return i

    def sync_work(i: int) -> int:
        enter()
        sessions.append(db.session())
        db.session.add(Item(name=f"c{i:02d}"))
        leave()
        return i

    func = async_work if kind == "coroutine" else sync_work

    async def main() -> list[int]:
        return list(
            await asyncio.gather(*(helper.execute_with_db_context(func, i) for i in range(n)))
        )

    assert asyncio.run(main()) == list(range(n))
    assert len(sessions) == n
    assert len({id(s) for s in sessions}) == n
    if kind == "coroutine":
        assert active["max"] == n
    assert stored_names(url) == [f"c{i:02d}" for i in range(n)]
    assert checked_out(db, app) == 0
    assert registry_is_empty(db)


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("func", [None, 42, "print", object()], ids=repr)
def test_non_callable_func_raises_value_error(app, db, func):
    helper = WebSocketContextHelper(app, db)
    with pytest.raises(ValueError, match="callable"):
        asyncio.run(helper.execute_with_db_context(func))
    with pytest.raises(ValueError, match="callable"):
        asyncio.run(helper.safe_execute_with_retry(func))
    assert checked_out(db, app) == 0


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"max_retries": "3"}, "max_retries"),
        ({"retry_delay": -0.5}, "retry_delay"),
        ({"retry_delay": float("nan")}, "retry_delay"),
        ({"retry_delay": "1"}, "retry_delay"),
    ],
)
def test_bad_retry_settings_raise_value_error_before_any_call(app, db, kwargs, word):
    helper = WebSocketContextHelper(app, db)
    calls = {"n": 0}

    def work() -> None:
        calls["n"] += 1

    with pytest.raises(ValueError, match=word):
        asyncio.run(helper.safe_execute_with_retry(work, **kwargs))
    assert calls["n"] == 0


def test_app_must_be_a_flask_app():
    with pytest.raises((TypeError, ValueError)):
        WebSocketContextHelper("not an app")  # type: ignore[arg-type]


def test_no_database_configured_raises_context_setup_error():
    helper = WebSocketContextHelper(Flask("bare"))
    calls = {"n": 0}

    def work() -> None:
        calls["n"] += 1

    with pytest.raises(ContextSetupError):
        asyncio.run(helper.execute_with_db_context(work))
    assert calls["n"] == 0
    assert helper.validate_connection_health() is False


# -- retries -----------------------------------------------------------------------------


def lost_connection() -> sa.exc.OperationalError:
    """What SQLAlchemy raises when the driver reports the connection gone."""
    return sa.exc.OperationalError(
        "SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True
    )


@pytest.mark.parametrize("kind", ["coroutine", "plain"])
def test_retry_gives_up_after_max_retries_plus_one_calls(app, db, Item, url, kind):
    helper = WebSocketContextHelper(app, db)
    errors: list[BaseException] = []
    sessions: list[Any] = []

    def sync_work(name: str) -> None:
        sessions.append(db.session())
        db.session.add(Item(name=f"{name}{len(sessions)}"))
        db.session.flush()
        errors.append(lost_connection())
        raise errors[-1]

    async def async_work(name: str) -> None:
        sync_work(name)

    func = async_work if kind == "coroutine" else sync_work
    with pytest.raises(RetryExhaustedError) as info:
        asyncio.run(helper.safe_execute_with_retry(func, "r", max_retries=2, retry_delay=0))
    assert len(errors) == 3
    assert info.value.attempts == 3
    assert info.value.__cause__ is errors[-1]
    assert info.value.last_exception is errors[-1]
    assert len({id(s) for s in sessions}) == 3, "each attempt gets a fresh session"
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


def test_retry_with_zero_retries_calls_once(app, db):
    helper = WebSocketContextHelper(app, db)
    calls = {"n": 0}

    def work() -> None:
        calls["n"] += 1
        raise lost_connection()

    with pytest.raises(RetryExhaustedError) as info:
        asyncio.run(helper.safe_execute_with_retry(work, max_retries=0, retry_delay=0))
    assert calls["n"] == 1
    assert info.value.attempts == 1


def test_retry_succeeds_after_a_transient_failure(app, db, Item, url):
    helper = WebSocketContextHelper(app, db)
    calls = {"n": 0}

    async def work() -> str:
        calls["n"] += 1
        db.session.add(Item(name=f"try{calls['n']}"))
        db.session.flush()
        if calls["n"] == 1:
            raise lost_connection()
        return "ok"

    assert asyncio.run(helper.safe_execute_with_retry(work, max_retries=3, retry_delay=0)) == "ok"
    assert calls["n"] == 2
    assert stored_names(url) == ["try2"]
    assert checked_out(db, app) == 0


@pytest.mark.parametrize("kind", ["value_error", "unique_violation"])
def test_non_transient_error_propagates_at_once_unchanged(app, db, Item, url, kind):
    helper = WebSocketContextHelper(app, db)
    with app.app_context():
        db.session.add(Item(name="taken"))
        db.session.commit()
    calls = {"n": 0}
    raised: list[BaseException] = []

    def work() -> None:
        calls["n"] += 1
        try:
            if kind == "value_error":
                raise ValueError("not transient")
            db.session.add(Item(name="taken"))
            db.session.flush()
        except Exception as exc:
            raised.append(exc)
            raise

    with pytest.raises(Exception) as info:
        asyncio.run(helper.safe_execute_with_retry(work, max_retries=3, retry_delay=0))
    assert calls["n"] == 1
    assert info.value is raised[0]
    assert not isinstance(info.value, RetryExhaustedError)
    if kind == "unique_violation":
        assert isinstance(info.value, sa.exc.IntegrityError)
    assert stored_names(url) == ["taken"]
    assert checked_out(db, app) == 0


@postgres_only
def test_retry_after_a_real_terminated_backend(app, db, Item, url):
    """The session's own PostgreSQL backend is killed on the first attempt."""
    helper = WebSocketContextHelper(app, db)
    calls = {"n": 0}
    failures: list[BaseException] = []

    def work() -> str:
        calls["n"] += 1
        db.session.add(Item(name=f"pg{calls['n']}"))
        db.session.flush()
        if calls["n"] == 1:
            try:
                db.session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
            except Exception as exc:
                failures.append(exc)
                raise
        return "recovered"

    result = asyncio.run(helper.safe_execute_with_retry(work, max_retries=2, retry_delay=0))
    assert result == "recovered"
    assert calls["n"] == 2
    assert isinstance(failures[0], sa.exc.OperationalError)
    assert stored_names(url) == ["pg2"]
    assert checked_out(db, app) == 0


@postgres_only
def test_retry_exhausted_by_real_terminated_backends(app, db, Item, url):
    helper = WebSocketContextHelper(app, db)
    failures: list[BaseException] = []

    def work() -> None:
        db.session.add(Item(name=f"pg{len(failures)}"))
        db.session.flush()
        try:
            db.session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        except Exception as exc:
            failures.append(exc)
            raise

    with pytest.raises(RetryExhaustedError) as info:
        asyncio.run(helper.safe_execute_with_retry(work, max_retries=1, retry_delay=0))
    assert len(failures) == 2
    assert info.value.attempts == 2
    assert info.value.__cause__ is failures[-1]
    assert stored_names(url) == []
    assert checked_out(db, app) == 0


# -- observation -------------------------------------------------------------------------


def test_get_connection_pool_status_shape(helper, app, db):
    status = helper.get_connection_pool_status()
    assert set(status) == POOL_KEYS
    assert status["bind"] == "default"
    assert status["pool_class"] == "QueuePool"
    assert status["size"] == 5
    assert status["capacity"] == 7
    assert status["checked_out"] == 0
    assert status["status"] == "healthy"
    with app.app_context():
        conn = db.engine.connect()
    try:
        status = helper.get_connection_pool_status()
        assert status["checked_out"] == 1
        assert status["utilization"] == pytest.approx(1 / 7, abs=1e-4)
    finally:
        conn.close()


def test_validate_connection_health(helper):
    assert helper.validate_connection_health() is True


def test_validate_connection_health_false_for_a_closed_port():
    app = Flask("down")
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://postgres@127.0.0.1:1/x"
    db = SQLAlchemy(app)
    helper = WebSocketContextHelper(app, db)
    assert helper.validate_connection_health() is False
