"""A start-up check that the database driver cooperates with green threads.

Under eventlet or gevent a blocking driver stalls the whole process while it waits
for the database (DESIGN section 1, case 6). ``eventlet.monkey_patch()`` makes
psycopg2 cooperative; under gevent psycopg2 needs ``psycogreen``; psycopg 3 has no
such patch for either.
"""

from __future__ import annotations

import logging
import sys

from sqlalchemy.engine import Engine

__all__ = ["check_green_driver"]

logger = logging.getLogger("socketio_dbctx")


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
    return None


def check_green_driver(engines: dict[str, Engine], async_mode: str | None) -> None:
    """Log a WARNING for each engine whose driver blocks the async mode."""
    for name, engine in engines.items():
        problem = green_driver_problem(engine, async_mode)
        if problem:
            logger.warning("engine %r: %s; every query stalls all other clients", name, problem)
