"""Statement timeouts on the server: the bound each backend enforces.

:func:`bound_transaction`, when an event's transaction begins: PostgreSQL ``SET LOCAL
statement_timeout`` (gone with the transaction); MariaDB ``SET SESSION
max_statement_time`` and MySQL ``SET SESSION max_execution_time`` (SELECTs only), both
reset when the connection goes back to the pool (:func:`reset_on_checkin`). SQLite has
no such bound: :mod:`socketio_dbctx.watchdog` interrupts it, and cuts the connection of
a server that stops answering.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

__all__ = ["bound_transaction", "reset_on_checkin"]

logger = logging.getLogger(__name__)

_RESET_KEY = "socketio_dbctx_timeout_reset"


def bound_transaction(connection: Connection, seconds: float) -> None:
    """Bound every statement of the transaction ``connection`` just began.

    :param seconds: the statement timeout.
    """
    dialect = connection.dialect
    if dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {math.ceil(seconds * 1000)}")
    elif dialect.name in ("mysql", "mariadb"):
        if getattr(dialect, "is_mariadb", False):
            connection.exec_driver_sql(f"SET SESSION max_statement_time = {seconds:.6f}")
        else:
            connection.exec_driver_sql(
                f"SET SESSION max_execution_time = {math.ceil(seconds * 1000)}"
            )
        connection.connection.info[_RESET_KEY] = (
            "SET SESSION max_statement_time = 0"
            if getattr(dialect, "is_mariadb", False)
            else "SET SESSION max_execution_time = 0"
        )


def _reset(dbapi_connection: Any, record: Any) -> None:
    reset = record.info.pop(_RESET_KEY, None)
    if reset is None or dbapi_connection is None:
        return
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(reset)
        finally:
            cursor.close()
    except Exception:  # a broken connection is discarded by the pool's own reset
        logger.debug("could not reset the session's statement timeout", exc_info=True)


def reset_on_checkin(engine: Engine) -> None:
    """Give MySQL/MariaDB connections back to the pool without the event's session-wide
    statement timeout. Idempotent; other backends need nothing."""
    if engine.dialect.name in ("mysql", "mariadb") and not sa_event.contains(
        engine, "checkin", _reset
    ):
        sa_event.listen(engine, "checkin", _reset)
