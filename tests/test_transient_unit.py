"""MySQL/MariaDB and SQLite failures, classified (``socketio_dbctx.transient``) and
decided (``retry.should_retry``, ``acks.error_code``) the tenacity way: build the
error, assert the decision. No server, no sleep.

The errors are the drivers' own: real PyMySQL exception objects (with and without the
SQLSTATE PyMySQL >= 1.1 attaches from the server's error packet), mysqlclient's
stand-ins (classes of a module named ``MySQLdb._exceptions``, as mysqlclient is not
installed here), and real ``sqlite3`` errors from a real database file next to their
message-only form (Python < 3.11 gives no code). Each is wrapped the way SQLAlchemy
wraps it (``DBAPIError.instance``), with a statement attached (no statement would
mean a failed connect, transient for another reason) and ``connection_invalidated``
left False, so that the error number alone decides. The same failures on real
servers: ``tests/test_mariadb_faults.py``.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pymysql
import pytest
from sqlalchemy import exc as sa_exc

from socketio_dbctx.acks import error_code
from socketio_dbctx.retry import should_retry
from socketio_dbctx.transient import (
    MYSQL_CONNECTION_ERRORS,
    is_connection_error,
    is_locked,
    is_rolled_back,
    is_statement_timeout,
    is_transient,
    mysql_code,
)

STATEMENT = "UPDATE items SET name = %(name)s WHERE items.id = %(id)s"


def _mysqlclient_exceptions() -> types.ModuleType:
    """A stand-in for mysqlclient's ``MySQLdb._exceptions`` (same names, same module
    name, errors built as ``OperationalError(errno, message)`` with no SQLSTATE)."""
    module = types.ModuleType("MySQLdb._exceptions")
    source = (
        "class MySQLError(Exception): pass\n"
        "class Error(MySQLError): pass\n"
        "class InterfaceError(Error): pass\n"
        "class DatabaseError(Error): pass\n"
        "class OperationalError(DatabaseError): pass\n"
        "class IntegrityError(DatabaseError): pass\n"
        "class ProgrammingError(DatabaseError): pass\n"
    )
    exec(compile(source, "<MySQLdb._exceptions>", "exec"), module.__dict__)
    return module


MySQLdb_exceptions = _mysqlclient_exceptions()


def wrap(orig: BaseException, base: type[BaseException], statement: str = STATEMENT) -> Any:
    """``orig`` wrapped the way SQLAlchemy raises it (its class picked by name)."""
    return sa_exc.DBAPIError.instance(statement, {"name": "x", "id": 1}, orig, base)  # type: ignore[arg-type]


def pymysql_error(
    number: int, message: str, sqlstate: str | None = None, cls: str = "OperationalError"
) -> Any:
    orig = getattr(pymysql.err, cls)(number, message)
    if sqlstate is not None:  # as PyMySQL >= 1.1 does with the server's (1.0 has none)
        orig.sqlstate = sqlstate
    return wrap(orig, pymysql.err.Error)


def mysqlclient_error(number: int, message: str, cls: str = "OperationalError") -> Any:
    orig = getattr(MySQLdb_exceptions, cls)(number, message)
    return wrap(orig, MySQLdb_exceptions.Error)


# -- MySQL / MariaDB ---------------------------------------------------------------------

#: number, message, the server's SQLSTATE (None: raised by the client library), kind
MYSQL_ERRORS: list[tuple[int, str, str | None, str]] = [
    (1213, "Deadlock found when trying to get lock; try restarting transaction", "40001", "rb"),
    (1205, "Lock wait timeout exceeded; try restarting transaction", "HY000", "locked"),
    (2002, "Can't connect to local server through socket", None, "conn"),
    (2003, "Can't connect to MySQL server on '127.0.0.1' ([Errno 111])", None, "conn"),
    (2006, "MySQL server has gone away", None, "conn"),
    (2013, "Lost connection to MySQL server during query", None, "conn"),
    (1053, "Server shutdown in progress", "08S01", "conn"),
    (1927, "Connection was killed", "70100", "conn"),
    (4031, "The client was disconnected by the server because of inactivity", "HY000", "conn"),
    (1969, "Query execution was interrupted (max_statement_time exceeded)", "70100", "timeout"),
    (
        3024,
        "Query execution was interrupted, maximum statement execution time exceeded",
        "HY000",
        "timeout",
    ),
    (1062, "Duplicate entry 'x' for key 'name'", "23000", "other"),
    (1064, "You have an error in your SQL syntax", "42000", "other"),
    (1146, "Table 'test.nope' doesn't exist", "42S02", "other"),
    (1317, "Query execution was interrupted", "70100", "other"),  # KILL QUERY: not ours
    (1040, "Too many connections", "08004", "other"),  # at a statement: not a lost link
]

#: What each kind must be: transient, retried before COMMIT, retried at COMMIT
#: (not idempotent), the ack's error code when it is the final answer.
KINDS = {
    "rb": (True, True, True, "internal_error"),
    "locked": (True, True, False, "internal_error"),
    "conn": (True, True, False, "db_unavailable"),
    "timeout": (False, False, False, "timeout"),
    "other": (False, False, False, "internal_error"),
}

MAKERS: dict[str, Callable[[int, str, str | None], Any]] = {
    "pymysql": lambda number, message, state: pymysql_error(number, message),
    "pymysql+sqlstate": lambda number, message, state: pymysql_error(number, message, state),
    "mysqlclient": lambda number, message, state: mysqlclient_error(number, message),
}


def _mysql_cases() -> Iterator[Any]:
    for driver, make in MAKERS.items():
        for number, message, state, kind in MYSQL_ERRORS:
            if driver == "pymysql+sqlstate" and state is None:
                continue  # client-side errors carry no SQLSTATE
            yield pytest.param(make, number, message, state, kind, id=f"{driver}-{number}")


@pytest.mark.parametrize(("make", "number", "message", "state", "kind"), list(_mysql_cases()))
def test_mysql_error_numbers_decide(
    make: Callable[..., Any], number: int, message: str, state: str | None, kind: str
) -> None:
    error = make(number, message, state)
    transient, before_commit, at_commit, code = KINDS[kind]
    assert mysql_code(error) == number
    assert is_transient(error) is transient
    assert is_connection_error(error) is (kind == "conn")
    assert is_rolled_back(error) is (kind == "rb")
    assert is_locked(error) is (kind == "locked")
    assert is_statement_timeout(error) is (kind == "timeout")
    for phase in ("admission", "handler"):
        assert should_retry(error, phase=phase, idempotent=False) is before_commit
    assert should_retry(error, phase="commit", idempotent=False) is at_commit
    # an idempotent handler runs again after any transient failure, COMMIT included
    assert should_retry(error, phase="commit", idempotent=True) is transient
    # never past a COMMIT of the same attempt that went through
    assert should_retry(error, phase="handler", idempotent=False, committed=True) is False
    assert error_code(error) == code


def test_the_table_covers_every_connection_number() -> None:
    assert {n for n, _, _, kind in MYSQL_ERRORS if kind == "conn"} == MYSQL_CONNECTION_ERRORS


def test_pymysql_1927_is_a_lost_connection_despite_its_sqlstate() -> None:
    """PyMySQL >= 1.1 attaches the server's SQLSTATE: ``1927`` comes with ``70100``,
    which means nothing to the SQLSTATE rules; the number decides."""
    error = pymysql_error(1927, "Connection was killed", "70100")
    assert error.orig.sqlstate == "70100"
    assert is_connection_error(error) and is_transient(error)
    assert error_code(error) == "db_unavailable"


def test_a_deadlock_is_rolled_back_whatever_the_driver_says_its_sqlstate_is() -> None:
    for error in (
        pymysql_error(1213, "Deadlock found", "40001"),
        pymysql_error(1213, "Deadlock found"),
        mysqlclient_error(1213, "Deadlock found"),
    ):
        assert should_retry(error, phase="commit", idempotent=False) is True


def test_mysql_errors_are_wrapped_by_class() -> None:
    """``DBAPIError.instance`` picks SQLAlchemy's class by the driver's class name, and
    the numbers decide for every class (an ``InternalError`` 1213 is still a deadlock)."""
    assert isinstance(pymysql_error(2013, "Lost connection"), sa_exc.OperationalError)
    deadlock = pymysql_error(1213, "Deadlock found", "40001", cls="InternalError")
    assert isinstance(deadlock, sa_exc.InternalError)
    assert is_rolled_back(deadlock)
    duplicate = mysqlclient_error(1062, "Duplicate entry", cls="IntegrityError")
    assert isinstance(duplicate, sa_exc.IntegrityError)
    assert not is_transient(duplicate)


def test_driver_disconnect_errors_invalidated_by_sqlalchemy_are_transient() -> None:
    """PyMySQL's ``InterfaceError(0, '')`` on a closed connection has no useful number;
    SQLAlchemy's dialect recognises it and invalidates the connection."""
    orig = pymysql.err.InterfaceError(0, "")
    error = sa_exc.DBAPIError.instance(
        STATEMENT, {}, orig, pymysql.err.Error, connection_invalidated=True
    )
    assert mysql_code(error) == 0
    assert is_transient(error) and is_connection_error(error)
    assert should_retry(error, phase="handler", idempotent=False) is True


def test_a_failed_connect_is_transient_whatever_its_number() -> None:
    """A connect refused with ``1040 Too many connections`` (no statement attached)."""
    error = wrap(pymysql.err.OperationalError(1040, "Too many connections"), pymysql.err.Error)
    error.statement = None
    assert is_transient(error) and is_connection_error(error)


@pytest.mark.parametrize(
    "orig",
    [
        Exception(1213, "not from a MySQL driver"),
        type("OperationalError", (Exception,), {"__module__": "mysql.fake"})(1213, "x"),
        pymysql.err.OperationalError("1213", "a number as text is not the server's"),
    ],
    ids=["plain_exception", "other_module", "text_number"],
)
def test_numbers_count_only_from_mysql_drivers(orig: BaseException) -> None:
    error = wrap(orig, Exception)
    assert mysql_code(error) is None
    assert not is_transient(error)


# -- SQLite ------------------------------------------------------------------------------


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "locks.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    yield path


def real_busy(path: Path) -> sqlite3.OperationalError:
    """``database is locked`` (SQLITE_BUSY) from a second writer on a real file."""
    first = sqlite3.connect(path, timeout=0)
    second = sqlite3.connect(path, timeout=0)
    try:
        first.execute("BEGIN IMMEDIATE")
        first.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.OperationalError) as info:
            second.execute("INSERT INTO t VALUES (2)")
        return info.value
    finally:
        first.rollback()
        first.close()
        second.close()


def real_table_locked(path: Path) -> sqlite3.OperationalError:
    """``database table is locked`` (SQLITE_LOCKED): a table dropped under a running
    statement of the same connection."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executemany("INSERT INTO t VALUES (?)", [(1,), (2,)])
        reading = conn.execute("SELECT x FROM t")
        reading.fetchone()  # the statement is running
        with pytest.raises(sqlite3.OperationalError) as info:
            conn.execute("DROP TABLE t")
        return info.value
    finally:
        conn.close()


#: A query that never ends by itself.
ENDLESS = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"


def real_interrupted(path: Path) -> sqlite3.OperationalError:
    """``interrupted`` (SQLITE_INTERRUPT), as ``Connection.interrupt()`` gives it: here
    from a progress handler, which interrupts the same way, without a race."""
    conn = sqlite3.connect(path)
    try:
        conn.set_progress_handler(lambda: 1, 1)
        with pytest.raises(sqlite3.OperationalError) as info:
            conn.execute(ENDLESS)
        return info.value
    finally:
        conn.close()


def real_interrupt_from_another_thread(path: Path) -> sqlite3.OperationalError:
    """``interrupt()`` called from another thread while a statement runs, as a
    statement-timeout watchdog would; the statement has started before the call."""
    conn = sqlite3.connect(path, check_same_thread=False)
    started = threading.Event()

    def progress() -> int:
        started.set()
        return 0

    conn.set_progress_handler(progress, 1000)
    watchdog = threading.Thread(target=lambda: (started.wait(10), conn.interrupt()))
    watchdog.start()
    try:
        with pytest.raises(sqlite3.OperationalError) as info:
            conn.execute(ENDLESS)
        return info.value
    finally:
        watchdog.join(10)
        conn.close()


def message_only(message: str) -> sqlite3.OperationalError:
    """The error as Python < 3.11 raises it: no ``sqlite_errorcode``."""
    error = sqlite3.OperationalError(message)
    assert not hasattr(error, "sqlite_errorcode")
    return error


def with_code(message: str, code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


SQLITE_LOCKED_ERRORS: dict[str, Callable[[Path], sqlite3.OperationalError]] = {
    "real_busy": real_busy,
    "real_table_locked": real_table_locked,
    "message_only_busy": lambda path: message_only("database is locked"),
    "message_only_table_locked": lambda path: message_only("database table is locked"),
    # SQLITE_BUSY_SNAPSHOT (5 | 2 << 8): a WAL reader that cannot upgrade to a writer
    "extended_517": lambda path: with_code("database is locked", 517),
    # SQLITE_LOCKED_SHAREDCACHE (6 | 1 << 8)
    "extended_262": lambda path: with_code("database table is locked", 262),
}


@pytest.mark.parametrize("make", SQLITE_LOCKED_ERRORS.values(), ids=SQLITE_LOCKED_ERRORS)
def test_sqlite_locked_is_retried_before_commit_only(
    make: Callable[[Path], sqlite3.OperationalError], sqlite_file: Path
) -> None:
    orig = make(sqlite_file)
    if make is real_busy:
        assert str(orig) == "database is locked"
        if sys.version_info >= (3, 11):  # before, sqlite3 gives no code
            assert orig.sqlite_errorcode == sqlite3.SQLITE_BUSY
    if make is real_table_locked and sys.version_info >= (3, 11):
        assert orig.sqlite_errorcode == sqlite3.SQLITE_LOCKED
    error = wrap(orig, sqlite3.Error, "INSERT INTO t VALUES (?)")
    assert isinstance(error, sa_exc.OperationalError)
    assert is_locked(error) and is_transient(error)
    assert not is_connection_error(error) and not is_rolled_back(error)
    assert not is_statement_timeout(error)
    assert should_retry(error, phase="handler", idempotent=False) is True
    assert should_retry(error, phase="admission", idempotent=False) is True
    # at COMMIT a lock means "maybe not committed": only an idempotent handler runs again
    assert should_retry(error, phase="commit", idempotent=False) is False
    assert should_retry(error, phase="commit", idempotent=True) is True
    assert should_retry(error, phase="handler", idempotent=False, committed=True) is False


SQLITE_INTERRUPTED: dict[str, Callable[[Path], sqlite3.OperationalError]] = {
    "real_progress_handler": real_interrupted,
    "real_interrupt_call": real_interrupt_from_another_thread,
    "message_only": lambda path: message_only("interrupted"),
}


@pytest.mark.parametrize("make", SQLITE_INTERRUPTED.values(), ids=SQLITE_INTERRUPTED)
def test_sqlite_interrupted_is_a_statement_timeout(
    make: Callable[[Path], sqlite3.OperationalError], sqlite_file: Path
) -> None:
    orig = make(sqlite_file)
    assert str(orig) == "interrupted"
    error = wrap(orig, sqlite3.Error, "SELECT count(*) FROM n")
    assert is_statement_timeout(error)
    assert not is_transient(error)
    assert should_retry(error, phase="handler", idempotent=True) is False
    assert error_code(error) == "timeout"


@pytest.mark.parametrize(
    "message",
    ["no such table: nope", "disk I/O error", "database disk image is malformed", "locked"],
)
def test_other_sqlite_errors_are_not_transient(message: str) -> None:
    error = wrap(message_only(message), sqlite3.Error, "SELECT 1")
    assert not is_transient(error)
    assert not is_statement_timeout(error)
    assert error_code(error) == "internal_error"


def test_sqlite_unique_violation_is_not_transient(sqlite_file: Path) -> None:
    conn = sqlite3.connect(sqlite_file)
    try:
        conn.execute("CREATE UNIQUE INDEX ux ON t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError) as info:
            conn.execute("INSERT INTO t VALUES (1)")
    finally:
        conn.close()
    error = wrap(info.value, sqlite3.Error, "INSERT INTO t VALUES (1)")
    assert isinstance(error, sa_exc.IntegrityError)
    assert not is_transient(error) and not is_locked(error)
