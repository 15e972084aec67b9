"""Which database failures are worth another attempt (pure classification, no I/O)."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

__all__ = [
    "ROLLED_BACK_SQLSTATES",
    "TRANSIENT_SQLSTATES",
    "is_connection_error",
    "is_rolled_back",
    "is_transient",
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


def sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a driver error wrapped by SQLAlchemy, if there is one.

    Understands psycopg2 (``pgcode``), psycopg 3 and asyncpg (``sqlstate``).
    """
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` says the connection is gone or could not be opened."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    # SQLAlchemy wraps a failed connect with no statement attached.
    if isinstance(exc, sa_exc.OperationalError) and exc.statement is None:
        return True
    code = sqlstate(exc)
    if code is None:
        return False
    return (code.startswith("08") and code != _UNKNOWN_OUTCOME) or code in _SHUTDOWN_SQLSTATES


def is_rolled_back(exc: BaseException) -> bool:
    """True for a serialization failure or deadlock: the server undid everything."""
    return isinstance(exc, sa_exc.DBAPIError) and sqlstate(exc) in ROLLED_BACK_SQLSTATES


def is_transient(exc: BaseException) -> bool:
    """Tell whether running the same work again may succeed.

    True for a lost or refused connection (``connection_invalidated``, a failed
    connect, SQLSTATE class ``08`` except ``08007``, ``57P01``-``57P03``) and for
    ``40001``/``40P01``. False for a pool checkout timeout, where retrying only
    adds load to a saturated pool, and for everything else.

    :param exc: the exception to classify.
    """
    if isinstance(exc, sa_exc.TimeoutError):
        return False
    return is_connection_error(exc) or is_rolled_back(exc)
