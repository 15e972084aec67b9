"""A start-up check that the database driver cooperates with green threads.

Under eventlet or gevent a blocking driver stalls the whole process while it waits
for the database. ``eventlet.monkey_patch()`` makes
psycopg2 cooperative; under gevent psycopg2 needs ``psycogreen``; psycopg 3 has no
such patch for either. For MySQL/MariaDB, PyMySQL is pure Python (its sockets are
green once monkey-patched); mysqlclient (``MySQLdb``) and MariaDB Connector/Python
wait inside C, where no monkey patching reaches.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = ["check_green_driver", "enforce_connect_timeout", "green_driver_problem"]

logger = logging.getLogger(__name__)


#: MySQL/MariaDB drivers (SQLAlchemy's name -> what users install) that wait for the
#: server inside C code, out of reach of eventlet's and gevent's monkey patching.
_BLOCKING_MYSQL_DRIVERS = {
    "mysqldb": "mysqlclient (MySQLdb)",
    "mariadbconnector": "MariaDB Connector/Python (mariadb)",
}


def green_driver_problem(engine: Engine, async_mode: str | None) -> str | None:
    """Describe why ``engine``'s driver would block ``async_mode``, or return None."""
    if async_mode not in ("eventlet", "gevent"):
        return None
    driver = engine.dialect.driver
    if driver == "psycopg2":
        extensions = sys.modules.get("psycopg2.extensions")
        if extensions is not None and extensions.get_wait_callback() is not None:
            return None
        fix = (
            "call eventlet.monkey_patch() before importing anything else"
            if async_mode == "eventlet"
            else "pip install psycogreen and call psycogreen.gevent.patch_psycopg() "
            "right after gevent.monkey.patch_all()"
        )
        return f"psycopg2 is not cooperative under {async_mode}: {fix}"
    if driver in ("psycopg", "psycopg_async"):
        return (
            f"psycopg 3 blocks the whole process under {async_mode}; use psycopg2 "
            f"(monkey-patched) or the threading async mode"
        )
    if driver in _BLOCKING_MYSQL_DRIVERS:
        return (
            f"{_BLOCKING_MYSQL_DRIVERS[driver]} blocks the whole process under {async_mode}; "
            f"use PyMySQL (mysql+pymysql://, pure Python, green once monkey-patched) or the "
            f"threading async mode"
        )
    return None


def check_green_driver(engines: dict[str, Engine], async_mode: str | None) -> None:
    """Log a WARNING for each engine whose driver blocks the async mode."""
    for name, engine in engines.items():
        problem = green_driver_problem(engine, async_mode)
        if problem:
            logger.warning("engine %r: %s; every query stalls all other clients", name, problem)


def _timeout_class(async_mode: str) -> Any:
    if async_mode == "eventlet":
        from eventlet.timeout import Timeout as EventletTimeout

        return EventletTimeout
    from gevent import Timeout as GeventTimeout

    return GeventTimeout


def _connect_timeout(cparams: dict[str, Any]) -> float | None:
    raw = cparams.get("connect_timeout")
    try:
        seconds = float(raw) if raw is not None and raw != "" else 0.0
    except (TypeError, ValueError):
        return None
    # libpq treats values below 2 as 2
    return max(2.0, seconds) if seconds > 0 else None


def _make_listener(async_mode: str) -> Callable[..., Any]:
    timeout_class = _timeout_class(async_mode)

    def bounded_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
        seconds = _connect_timeout(cparams)
        if seconds is None:
            return None  # no timeout configured: SQLAlchemy connects as usual
        timeout = timeout_class(seconds)
        if async_mode == "gevent":
            timeout.start()  # eventlet's Timeout starts itself, gevent's does not
        try:
            return dialect.connect(*cargs, **cparams)
        except BaseException as exc:
            if exc is timeout:
                raise dialect.loaded_dbapi.OperationalError(
                    f"timeout expired: no answer from the database within {seconds}s "
                    "(connect_timeout, enforced by socketio_dbctx)"
                ) from None
            raise
        finally:
            timeout.cancel()

    return bounded_connect


_LISTENERS: dict[str, Callable[..., Any]] = {}


def enforce_connect_timeout(engine: Engine, async_mode: str | None) -> None:
    """Make psycopg2 honour ``connect_timeout`` under eventlet and gevent.

    Green psycopg2 connects asynchronously, and libpq does not enforce
    ``connect_timeout`` in that mode: a database that accepts the TCP connection but
    never answers would hang the connect (and its event) for ever. The connect is
    bounded with the async mode's own ``Timeout`` instead, failing with the driver's
    ``OperationalError`` like a refused connect (so it is retried, then
    ``db_unavailable``).
    """
    if async_mode not in ("eventlet", "gevent") or engine.dialect.driver != "psycopg2":
        return
    listener = _LISTENERS.get(async_mode)
    if listener is None:
        listener = _LISTENERS[async_mode] = _make_listener(async_mode)
    if not event.contains(engine, "do_connect", listener):
        event.listen(engine, "do_connect", listener)
