"""What resolving lost COMMITs and bounding statements cost a successful event.

One app on PostgreSQL with a ``DBContextNamespace`` and two handlers:

* ``write``: inserts one row (a transaction that wrote: it records
  ``txid_current_if_assigned()`` before COMMIT, one extra round trip);
* ``read``: selects one row by primary key (read-only: records nothing).

Each handler runs in interleaved A/B rounds against a variant with the feature off,
in the same process over the same database: ``txid off`` replaces the transaction-id
lookup with one that asks nothing (what the library did before it resolved lost
COMMITs); ``timeout on`` sets ``DBCTX_STATEMENT_TIMEOUT`` (one ``SET LOCAL`` per
transaction, plus the watchdog's statement listener). Events go through the real
dispatch path with Flask-SocketIO's test client on one thread, so the numbers are
Python and local round trips, not network noise. The table shows per-event medians
and the median per-round ratio.

Run from the repository root::

    python benchmarks/commit_cost.py [--rounds 11] [--events 1000] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``), in a schema of its own, dropped
at the end. Exit code 0 unless the benchmark itself fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import sqlalchemy as sa
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace, transactions

POSTGRES_URL = os.environ.get(
    "DBCTX_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def build(url: str, schema: str, timeout: float | None) -> tuple[Any, Callable[[], None]]:
    """A client of a fresh app (statement timeout ``timeout``) and its cleanup."""
    app = Flask(f"bench-{timeout}")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"options": f"-csearch_path={schema}"}},
        DBCTX_STATEMENT_TIMEOUT=timeout,
    )
    db = SQLAlchemy(app)
    socketio = SocketIO(app, async_mode="threading")
    counter = iter(range(10**9))

    class Bench(DBContextNamespace):
        def on_write(self) -> int:
            db.session.execute(sa.text("INSERT INTO rows (v) VALUES (:v)"), {"v": next(counter)})
            return 1

        def on_read(self) -> int:
            return int(db.session.execute(sa.text("SELECT v FROM rows WHERE id = 1")).scalar())

    socketio.on_namespace(Bench("/b"))
    DBContext(app, socketio, db)
    client = socketio.test_client(app, namespace="/b")

    def close() -> None:
        client.disconnect(namespace="/b")
        with app.app_context():
            db.engine.dispose()

    return client, close


@contextmanager
def txid_off() -> Iterator[None]:
    """The library as it was before lost COMMITs were resolved."""
    original = transactions.transaction_id
    transactions.transaction_id = lambda connection: None  # type: ignore[assignment]
    try:
        yield
    finally:
        transactions.transaction_id = original  # type: ignore[assignment]


@contextmanager
def nothing() -> Iterator[None]:
    yield


def per_event(client: Any, event: str, n: int, around: Callable[[], Any]) -> float:
    with around():
        start = time.perf_counter()
        for _ in range(n):
            ack = client.emit(event, namespace="/b", callback=True)
            assert ack == 1 or isinstance(ack, int), ack
        return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 100 events")
    args = parser.parse_args(argv)
    rounds, n = (3, 100) if args.quick else (args.rounds, args.events)

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        conn.exec_driver_sql(f"CREATE TABLE {schema}.rows (id serial PRIMARY KEY, v int)")
        conn.exec_driver_sql(f"INSERT INTO {schema}.rows (v) VALUES (0)")
    plain_client, close_plain = build(POSTGRES_URL, schema, None)
    bounded_client, close_bounded = build(POSTGRES_URL, schema, 5.0)
    # (label, event, baseline (client, around), variant (client, around))
    comparisons = [
        ("write: txid lookup", "write", (plain_client, txid_off), (plain_client, nothing)),
        ("read: txid lookup", "read", (plain_client, txid_off), (plain_client, nothing)),
        ("write: statement timeout", "write", (plain_client, nothing), (bounded_client, nothing)),
        ("read: statement timeout", "read", (plain_client, nothing), (bounded_client, nothing)),
    ]
    try:
        for _, event, (client, around), _variant in comparisons:  # warm up
            per_event(client, event, 50, around)
        python = sys.version.split()[0]
        print(f"PostgreSQL, {rounds} interleaved rounds of {n} events; Python {python}")
        print(f"{'comparison':<26} {'off µs':>8} {'on µs':>8} {'ratio':>6} {'added µs':>9}")
        for label, event, (base_client, base_around), (var_client, var_around) in comparisons:
            base: list[float] = []
            variant: list[float] = []
            for index in range(rounds):
                pair = [
                    (base, base_client, base_around),
                    (variant, var_client, var_around),
                ]
                for sink, client, around in pair if index % 2 else reversed(pair):
                    sink.append(per_event(client, event, n, around))
            ratio = statistics.median(v / b for v, b in zip(variant, base))
            off, on = statistics.median(base) * 1e6, statistics.median(variant) * 1e6
            print(f"{label:<26} {off:8.0f} {on:8.0f} {ratio:6.2f} {on - off:9.0f}")
    finally:
        close_plain()
        close_bounded()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
