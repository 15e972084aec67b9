"""Which database failures are worth another attempt (pure classification, no I/O).

Per backend (the README's "Databases" section says why each is retried):

- PostgreSQL, by SQLSTATE: ``40001``/``40P01`` rolled back; class ``08`` (not
  ``08007``) and ``57P01``-``57P03`` connection lost; ``57014`` statement cancelled.
- MySQL/MariaDB, by error number (PyMySQL and mysqlclient alike; checked before any
  SQLSTATE a driver attaches): deadlock ``1213`` rolled back; lock wait timeout ``1205``
  (only the statement was undone: retried before COMMIT); ``2002``, ``2003``, ``2006``,
  ``2013``, ``1053``, ``1927``, ``4031`` connection lost; ``3024``/``1969`` statement
  timeout.
- SQLite: ``database is locked`` / ``busy`` (retried before COMMIT); ``interrupted``
  is the statement timeout's watchdog.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

__all__ = [
    "MYSQL_CONNECTION_ERRORS",
    "MYSQL_LOCK_WAIT_TIMEOUT",
    "MYSQL_ROLLED_BACK",
    "MYSQL_STATEMENT_TIMEOUTS",
    "ROLLED_BACK_SQLSTATES",
    "TRANSIENT_SQLSTATES",
    "is_connection_error",
    "is_locked",
    "is_rolled_back",
    "is_statement_timeout",
    "is_transient",
    "mysql_code",
    "sqlstate",
]

#: The server rolled the whole transaction back: safe to retry at any point,
#: COMMIT included.
ROLLED_BACK_SQLSTATES = frozenset({"40001", "40P01"})

#: admin_shutdown, crash_shutdown, cannot_connect_now.
_SHUTDOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})

#: Every SQLSTATE :func:`is_transient` accepts, besides class ``08``.
TRANSIENT_SQLSTATES = ROLLED_BACK_SQLSTATES | _SHUTDOWN_SQLSTATES

# 08007 transaction_resolution_unknown: the COMMIT may have happened.
_UNKNOWN_OUTCOME = "08007"

#: query_canceled: statement_timeout (or pg_cancel_backend) cut the statement.
_CANCELED_SQLSTATE = "57014"

#: MySQL/MariaDB deadlock: the server rolled the whole transaction back.
MYSQL_ROLLED_BACK = frozenset({1213})
#: innodb_lock_wait_timeout: only the waiting statement was rolled back.
MYSQL_LOCK_WAIT_TIMEOUT = 1205
#: can't connect (2002, 2003), server gone (2006), lost during query (2013), shutdown
#: in progress (1053), connection killed (1927), idle connection closed (4031).
MYSQL_CONNECTION_ERRORS = frozenset({2002, 2003, 2006, 2013, 1053, 1927, 4031})
#: MySQL max_execution_time (3024), MariaDB max_statement_time (1969).
MYSQL_STATEMENT_TIMEOUTS = frozenset({3024, 1969})

_SQLITE_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)
_SQLITE_INTERRUPT = 9


def sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a driver error wrapped by SQLAlchemy, if there is one.

    Understands psycopg2 (``pgcode``), psycopg 3 and asyncpg (``sqlstate``).
    """
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def _orig(exc: BaseException) -> BaseException:
    # The driver's error; SQLAlchemy types ``orig`` as optional.
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else None
    return orig if orig is not None else exc


def mysql_code(exc: BaseException) -> int | None:
    """The MySQL/MariaDB error number of a PyMySQL or mysqlclient error, if it is one."""
    orig = _orig(exc)
    if not type(orig).__module__.startswith(("pymysql", "MySQLdb")):
        return None
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _sqlite_code(exc: BaseException) -> int | None:
    # The primary result code (the low byte of an extended code); None when the
    # error is not SQLite's. Python < 3.11 has no code on the error: read the text.
    orig = _orig(exc)
    if type(orig).__module__ != "sqlite3":
        return None
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(orig).lower()
    if "is locked" in text or "database is busy" in text:
        return 5
    if text == "interrupted":
        return _SQLITE_INTERRUPT
    return None


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` says the connection is gone or could not be opened."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    # SQLAlchemy wraps a failed connect with no statement attached.
    if isinstance(exc, sa_exc.OperationalError) and exc.statement is None:
        return True
    number = mysql_code(exc)
    if number is not None:  # before the SQLSTATE PyMySQL attaches (1927 carries 70100)
        return number in MYSQL_CONNECTION_ERRORS
    code = sqlstate(exc)
    if code is None:
        return False
    return (code.startswith("08") and code != _UNKNOWN_OUTCOME) or code in _SHUTDOWN_SQLSTATES


def is_rolled_back(exc: BaseException) -> bool:
    """True for a serialization failure or deadlock: the server undid everything."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    number = mysql_code(exc)
    if number is not None:
        return number in MYSQL_ROLLED_BACK or sqlstate(exc) in ROLLED_BACK_SQLSTATES
    return sqlstate(exc) in ROLLED_BACK_SQLSTATES


def is_locked(exc: BaseException) -> bool:
    """True for a lock that was not granted in time, where only the statement failed:
    MySQL/MariaDB lock wait timeout ``1205``, SQLite ``database is locked``/``busy``.
    Worth running again, but never past a COMMIT that may have gone through."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    return mysql_code(exc) == MYSQL_LOCK_WAIT_TIMEOUT or _sqlite_code(exc) in _SQLITE_BUSY_CODES


def is_statement_timeout(exc: BaseException) -> bool:
    """True when the server (or SQLite's watchdog) cancelled a statement that ran too long:
    PostgreSQL ``57014``, MySQL ``3024``, MariaDB ``1969``, SQLite ``interrupted``."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    number = mysql_code(exc)
    if number is not None:
        return number in MYSQL_STATEMENT_TIMEOUTS
    return sqlstate(exc) == _CANCELED_SQLSTATE or _sqlite_code(exc) == _SQLITE_INTERRUPT


def is_transient(exc: BaseException) -> bool:
    """Tell whether running the same work again may succeed.

    True for a lost or refused connection (``connection_invalidated``, a failed
    connect, SQLSTATE class ``08`` except ``08007``, ``57P01``-``57P03``, the MySQL
    numbers of :data:`MYSQL_CONNECTION_ERRORS`), for a rolled-back transaction
    (``40001``/``40P01``, MySQL ``1213``) and for a lock not granted in time
    (:func:`is_locked`). False for a pool checkout timeout, where retrying only adds
    load to a saturated pool, for a statement timeout, and for everything else.

    :param exc: the exception to classify.
    """
    if isinstance(exc, sa_exc.TimeoutError):
        return False
    return is_connection_error(exc) or is_rolled_back(exc) or is_locked(exc)
