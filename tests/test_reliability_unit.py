"""The rules and mechanisms behind issue 13, one at a time: reading an idempotency key,
claiming and storing it, when a re-run is safe, a statement timeout's precedence, the
watchdog's cut, and resolving a lost COMMIT with ``txid_status``. Real servers test
the wiring (``test_statement_timeouts``, ``test_outcomes``, ``test_idempotency``)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from socketio_dbctx import InvalidRequestError, idempotency_table
from socketio_dbctx.config import Settings
from socketio_dbctx.idempotency import MAX_KEY_LENGTH, TABLE_NAME, KeyStore, purge, read_key
from socketio_dbctx.outcomes import resolve
from socketio_dbctx.retry import rerun_is_safe, should_retry
from socketio_dbctx.settle import statement_timeout_of
from socketio_dbctx.transactions import _is_select_text
from socketio_dbctx.watchdog import GRACE, Watch, Watchdog, cut

# -- reading the key --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("a", "a"), (5, "5"), (-3, "-3"), ("x" * MAX_KEY_LENGTH, "x" * MAX_KEY_LENGTH)],
    ids=["none", "str", "int", "negative-int", "longest"],
)
def test_a_key_is_text_or_none(value: Any, expected: str | None) -> None:
    assert read_key(lambda data: data, (value,)) == expected


@pytest.mark.parametrize(
    "value",
    [True, 1.5, [], {}, "", "x" * (MAX_KEY_LENGTH + 1), b"bytes", 10**300],
    ids=["bool", "float", "list", "dict", "empty", "too-long", "bytes", "huge-int"],
)
def test_a_key_of_the_wrong_kind_is_an_invalid_request(value: Any) -> None:
    with pytest.raises(InvalidRequestError, match="idempotency key"):
        read_key(lambda data: data, (value,))


def test_a_payload_the_key_function_cannot_read_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match="could not read the idempotency key"):
        read_key(lambda data: data["request_id"], ("not a dict",))


# -- when running again is safe -----------------------------------------------------


def _event(**options: Any) -> Any:
    key = options.pop("key", None)
    return SimpleNamespace(options=options, idempotency_key=key)


def test_a_keyed_event_may_run_again_after_a_lost_commit() -> None:
    lost = sa.exc.OperationalError("COMMIT", {}, Exception("gone"), connection_invalidated=True)
    assert not should_retry(lost, phase="commit", idempotent=rerun_is_safe(_event()))
    assert should_retry(lost, phase="commit", idempotent=rerun_is_safe(_event(key="k")))
    assert should_retry(lost, phase="commit", idempotent=rerun_is_safe(_event(idempotent=True)))


def test_the_handlers_statement_timeout_wins_even_when_none() -> None:
    settings = Settings(statement_timeout=5)
    assert statement_timeout_of(SimpleNamespace(options={}, settings=settings)) == 5
    event = SimpleNamespace(options={"statement_timeout": 2}, settings=settings)
    assert statement_timeout_of(event) == 2
    off = SimpleNamespace(options={"statement_timeout": None}, settings=settings)
    assert statement_timeout_of(off) is None


@pytest.mark.parametrize(
    ("sql", "reads"),
    [("SELECT 1", True), ("  select x from t", True), ("INSERT INTO t VALUES (1)", False)],
)
def test_a_text_select_is_not_a_write(sql: str, reads: bool) -> None:
    assert _is_select_text(sa.text(sql)) is reads


# -- the watchdog -----------------------------------------------------------------


def test_a_watch_is_overdue_only_while_waiting_past_its_limit() -> None:
    watch = Watch(1.0)
    assert watch.limit == 1.0 + GRACE
    assert not watch.overdue(time.monotonic() + 100)  # not waiting
    watch.start(object())
    assert not watch.overdue(time.monotonic())
    assert watch.overdue(time.monotonic() + watch.limit + 0.01)
    watch.stop()
    assert not watch.overdue(time.monotonic() + 100)
    assert Watch(1.0, interrupt=True).limit == 1.0  # SQLite: at the bound itself


def test_cutting_a_connection_ends_a_blocked_read_at_once() -> None:
    ours, theirs = socket.socketpair()  # the peer never answers
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(ours.recv(10)))
    reader.start()
    watch = Watch(0.0)
    watch.start(SimpleNamespace(fileno=ours.fileno))
    note = cut(watch)
    reader.join(5)
    try:
        assert not reader.is_alive() and got == [b""]
        assert watch.cut and watch.since is None
        assert note is not None and note[0] == logging.WARNING and "cut a database" in note[1]
    finally:
        ours.close()
        theirs.close()


def test_cutting_sqlite_interrupts_it() -> None:
    calls: list[str] = []
    watch = Watch(1.0, interrupt=True)
    watch.start(SimpleNamespace(interrupt=lambda: calls.append("interrupt")))
    assert cut(watch) is None
    assert calls == ["interrupt"] and watch.cut


def test_the_watchdog_thread_never_logs_its_notes_are_logged_by_the_scope(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under eventlet and gevent the logging locks are green: the watchdog's OS thread
    must not take them. What it did is logged by the next register() or unregister(),
    in the caller's thread."""
    ours, theirs = socket.socketpair()  # the peer never answers
    watchdog = Watchdog()
    hung = Watch(0.0, grace=0.0)  # overdue at once
    hung.start(SimpleNamespace(fileno=ours.fileno))
    broken = Watch(0.0, grace=0.0)
    broken.start(SimpleNamespace(fileno=lambda: 1 / 0))  # no socket to find
    failing = Watch(0.0, grace=0.0)
    failing.start(SimpleNamespace(fileno=lambda: 999_999))  # os.dup() raises EBADF
    caplog.set_level(logging.WARNING, logger="socketio_dbctx.watchdog")
    try:
        for watch in (hung, broken, failing):
            watchdog.register(watch)
        deadline = time.monotonic() + 5
        while not (hung.cut and broken.cut and failing.cut) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hung.cut and broken.cut and failing.cut
        time.sleep(0.3)  # a thread that logged would have done so by now
        assert caplog.records == []
        watchdog.unregister(hung)
        seen = [(r.levelno, r.getMessage(), r.thread) for r in caplog.records]
        me = threading.get_ident()
        assert seen == [
            (logging.WARNING, "cut a database connection that gave no answer for 0.0s", me),
            (logging.WARNING, "cannot cut a hung SimpleNamespace: no socket found", me),
            (logging.ERROR, "the statement watchdog could not cut a connection", me),
        ]
        assert caplog.records[2].exc_info is not None  # with the traceback
    finally:
        watchdog._pid = None  # ends the thread's loop
        ours.close()
        theirs.close()


# -- claiming and storing keys (SQLite) ------------------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: Any) -> Any:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/keys.db")
    idempotency_table(sa.MetaData()).create(engine)
    yield engine
    engine.dispose()


def _store(ttl: float = 60) -> KeyStore:
    return KeyStore(ttl, lambda target: None)  # no background purge in these tests


def test_the_first_claim_runs_and_a_repeat_gets_the_stored_ack(sqlite_engine: Any) -> None:
    from sqlalchemy.orm import Session

    store = _store()
    with Session(sqlite_engine) as session, session.begin():
        assert store.claim(session, "/ns", "ev", "k1") is None
        store.store(session, "/ns", "ev", "k1", {"ok": 1})
    with Session(sqlite_engine) as session, session.begin():
        stored = store.claim(session, "/ns", "ev", "k1")
        assert stored is not None and stored.ack == {"ok": 1}
        assert store.claim(session, "/ns", "other", "k1") is None  # per event
        assert store.claim(session, "/other", "ev", "k1") is None  # per namespace


def test_a_rolled_back_claim_releases_the_key(sqlite_engine: Any) -> None:
    from sqlalchemy.orm import Session

    store = _store()
    with Session(sqlite_engine) as session:
        with session.begin():
            assert store.claim(session, "/ns", "ev", "k") is None
            session.rollback()
        with session.begin():
            assert store.claim(session, "/ns", "ev", "k") is None


def test_an_expired_key_is_claimed_again_and_purged(sqlite_engine: Any) -> None:
    from sqlalchemy.orm import Session

    store = _store(ttl=0.05)
    with Session(sqlite_engine) as session, session.begin():
        assert store.claim(session, "/ns", "ev", "k") is None
        store.store(session, "/ns", "ev", "k", "first")
    time.sleep(0.06)  # the TTL itself is what is tested
    with Session(sqlite_engine) as session, session.begin():
        assert store.claim(session, "/ns", "ev", "k") is None
        store.store(session, "/ns", "ev", "k", "second")
    with Session(sqlite_engine) as session, session.begin():
        assert store.claim(session, "/ns", "ev", "other") is None
        store.store(session, "/ns", "ev", "other", None)
    time.sleep(0.06)
    assert purge(sqlite_engine) == 2
    with sqlite_engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {TABLE_NAME}")).scalar() == 0


def test_an_ack_that_is_not_json_is_refused(sqlite_engine: Any) -> None:
    from sqlalchemy.orm import Session

    store = _store()
    with Session(sqlite_engine) as session, session.begin():
        assert store.claim(session, "/ns", "ev", "k") is None
        with pytest.raises(TypeError, match="JSON-serialisable"):
            store.store(session, "/ns", "ev", "k", object())


# -- resolving a lost COMMIT (PostgreSQL) ------------------------------------------------


@pytest.fixture
def pg_engine(postgres_url: str) -> Any:
    engine = sa.create_engine(postgres_url)
    yield engine
    engine.dispose()


def _txid(engine: Any, commit: bool) -> int:
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE IF NOT EXISTS t_resolve (v int)")
        conn.commit()
        conn.exec_driver_sql("INSERT INTO t_resolve VALUES (1)")
        txid = int(conn.exec_driver_sql("SELECT txid_current_if_assigned()").scalar())
        conn.commit() if commit else conn.rollback()
    return txid


def test_txid_status_tells_committed_from_aborted(pg_engine: Any) -> None:
    committed = _txid(pg_engine, commit=True)
    aborted = _txid(pg_engine, commit=False)
    assert resolve([(pg_engine, committed)]) == "committed"
    assert resolve([(pg_engine, aborted)]) == "aborted"
    assert resolve([(pg_engine, committed), (pg_engine, aborted)]) is None  # mixed
    assert resolve([]) is None
    assert pg_engine.pool.checkedout() == 0


def test_an_unreachable_database_leaves_the_outcome_unknown_within_the_budget(
    pg_engine: Any,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    dead = sa.create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/test")
    start = time.monotonic()
    try:
        assert resolve([(dead, 1)], budget=0.6) is None
    finally:
        dead.dispose()
    assert time.monotonic() - start < 3
