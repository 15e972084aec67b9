"""Per-event overhead of ``DBContextNamespace`` against a plain ``flask_socketio.Namespace``.

Two apps over the same database, each with its own ``SocketIO`` and test client: a
plain ``flask_socketio.Namespace`` in an app without socketio_dbctx, and a
``DBContextNamespace`` in an app set up with ``DBContext(app, socketio, db)`` (so the
plain side carries none of our pool listeners). Their handlers are identical:

* ``noop``: ``return 1``;
* ``pk``: ``db.session.get(Item, 1)`` returned as a small dict (Flask-SQLAlchemy).

Events are driven through the namespaces' real dispatch path with Flask-SocketIO's
test client on one thread (``client.emit(..., callback=True)`` runs
``trigger_event -> _handle_event -> handler`` synchronously), so the numbers measure
Python code, not network noise. That path includes Flask-SocketIO's own per-event
request context, which is the honest baseline: with no outer app context, popping it
pops its app context, whose teardown makes Flask-SQLAlchemy remove the plain
handler's session. A hygiene check verifies that before anything is timed.

Each (database, handler) pair runs interleaved A/B rounds: every round times N events
of the plain namespace and N of ours, alternating which goes first. The table shows
the per-event medians over the rounds, the median of the per-round ratios
ours/plain, and the microseconds we add.

Run from the repository root::

    python benchmarks/overhead.py [--rounds 15] [--events 2000] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``); the benchmark works in a
schema of its own, dropped at the end. An unreachable server gives a "skipped" row.
The exit code is always 0: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from _harness import CORE_PACKAGES, bench_item_model, package_versions
from flask import Flask, has_app_context
from flask_socketio import Namespace, SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace

POSTGRES_URL = os.environ.get(
    "DBCTX_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)

#: Handler name -> (target ratio ours/plain, share of --events per round).
HANDLERS: dict[str, tuple[float, float]] = {"no-op": (1.35, 1.0), "PK lookup": (1.10, 0.5)}
EVENT_OF = {"no-op": "noop", "PK lookup": "pk"}

PACKAGES = (*CORE_PACKAGES, "tenacity", "psycopg2-binary")


# -- the app under test -------------------------------------------------------------------


@dataclass
class Side:
    """One app, its database handle and a test client connected to its namespace."""

    namespace: str
    app: Flask
    db: SQLAlchemy
    client: Any
    probe_sessions: list[Any]

    def emit(self, event: str) -> Any:
        return self.client.emit(event, namespace=self.namespace, callback=True)

    def pool_checked_out(self) -> int:
        with self.app.app_context():
            pool = self.db.engine.pool
            return pool.checkedout() if hasattr(pool, "checkedout") else 0

    def scoped_sessions_left(self) -> int:
        """Sessions still held by Flask-SQLAlchemy's scoped_session registry."""
        return len(self.db.session.registry.registry)

    def close(self) -> None:
        with self.app.app_context():
            for engine in self.db.engines.values():
                engine.dispose()


@dataclass
class Bench:
    """The plain app and the dbctx app, over the same database."""

    plain: Side
    ours: Side

    def side(self, namespace: str) -> Side:
        return self.plain if namespace == "/plain" else self.ours

    def emit(self, namespace: str, event: str) -> Any:
        return self.side(namespace).emit(event)

    def close(self) -> None:
        self.plain.close()
        self.ours.close()


def build_side(url: str, namespace: str) -> Side:
    """An app whose namespace runs the benchmark handlers.

    ``/plain`` is a ``flask_socketio.Namespace`` in an app without socketio_dbctx (so
    its engine carries none of our pool listeners); ``/dbctx`` is a
    ``DBContextNamespace`` in an app set up with ``DBContext(app, socketio, db)``.
    """
    app = Flask(f"overhead{namespace.replace('/', '_')}")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 5, "max_overflow": 10},
    )
    db = SQLAlchemy()
    db.init_app(app)

    Item = bench_item_model(app, db)

    socketio = SocketIO(app, async_mode="threading")
    probe_sessions: list[Any] = []

    class Handlers:
        """The handlers both namespaces run, byte for byte."""

        def on_noop(self) -> int:
            return 1

        def on_pk(self) -> dict[str, Any]:
            item = db.session.get(Item, 1)
            return {"id": item.id, "name": item.name, "price": item.price}

        def on_probe(self) -> bool:
            # hygiene check only (never timed): keep the session object alive so that
            # identities cannot be recycled, and take a connection
            session = db.session()
            probe_sessions.append(session)
            return db.session.get(Item, 1) is not None

    if namespace == "/plain":

        class Plain(Handlers, Namespace):  # type: ignore[misc]
            pass

        socketio.on_namespace(Plain(namespace))
    else:
        DBContext(app, socketio, db)

        class Ours(Handlers, DBContextNamespace):
            pass

        socketio.on_namespace(Ours(namespace))
    client = socketio.test_client(app, namespace=namespace)
    if not client.is_connected(namespace):
        raise RuntimeError(f"the test client could not connect to {namespace}")
    return Side(namespace, app, db, client, probe_sessions)


def build(url: str) -> Bench:
    return Bench(build_side(url, "/plain"), build_side(url, "/dbctx"))


# -- checks -------------------------------------------------------------------------------


def hygiene(bench: Bench, events: int = 50) -> str:
    """Verify that each variant gets a fresh session per event and leaks none."""
    if has_app_context():
        raise RuntimeError("an app context is active around the test client")
    parts = []
    for side in (bench.plain, bench.ours):
        ns = side.namespace
        side.probe_sessions.clear()
        for _ in range(events):
            if side.emit("probe") is not True:
                raise RuntimeError(f"{ns}: probe event failed")
            left, out = side.scoped_sessions_left(), side.pool_checked_out()
            if left or out:
                raise RuntimeError(
                    f"{ns}: after an event {left} session(s) stay in db.session's registry "
                    f"and {out} connection(s) stay checked out"
                )
        distinct = len({id(s) for s in side.probe_sessions})
        if distinct != events:
            raise RuntimeError(f"{ns}: {events} events shared {distinct} session(s)")
        parts.append(f"{ns} {distinct}/{events} distinct sessions")
        side.probe_sessions.clear()
    return ", ".join(parts) + "; 0 left in registry, 0 connections out after each event"


def check_acks(bench: Bench, event: str) -> None:
    plain, ours = bench.emit("/plain", event), bench.emit("/dbctx", event)
    if plain != ours:
        raise RuntimeError(f"{event}: acks differ: plain {plain!r}, dbctx {ours!r}")


# -- timing -------------------------------------------------------------------------------


def time_block(side: Side, event: str, n: int) -> float:
    """Microseconds per event over ``n`` events (the same loop for both sides)."""
    emit, namespace = side.client.emit, side.namespace
    start = time.perf_counter()
    for _ in range(n):
        emit(event, namespace=namespace, callback=True)
    return (time.perf_counter() - start) / n * 1e6


@dataclass
class Result:
    database: str
    handler: str
    plain: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    skipped: str | None = None  # "skipped: ..." or "failed: ...": why there are no numbers

    @property
    def ratios(self) -> list[float]:
        return [o / p for o, p in zip(self.ours, self.plain)]

    @property
    def added(self) -> list[float]:
        return [o - p for o, p in zip(self.ours, self.plain)]


def measure(bench: Bench, database: str, handler: str, rounds: int, n: int) -> Result:
    event = EVENT_OF[handler]
    check_acks(bench, event)
    # warm-up: caches, the pool, SQLAlchemy's compiled statement cache, the CPU
    warm = max(100, n // 4)
    for side in (bench.plain, bench.ours):
        time_block(side, event, warm)
    result = Result(database, handler)
    for r in range(rounds):
        order = (bench.plain, bench.ours) if r % 2 == 0 else (bench.ours, bench.plain)
        for side in order:
            gc.collect()
            us = time_block(side, event, n)
            (result.plain if side is bench.plain else result.ours).append(us)
        for side in (bench.plain, bench.ours):
            if side.scoped_sessions_left() or side.pool_checked_out():
                raise RuntimeError(f"{database} {handler} {side.namespace}: a session leaked")
    return result


# -- databases ----------------------------------------------------------------------------


def schema_url(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def run_database(
    database: str, url: str, rounds: int, events: int, notes: list[str]
) -> list[Result]:
    bench = build(url)
    try:
        notes.append(f"{database}: hygiene: {hygiene(bench)}")
        results = []
        for handler, (_, share) in HANDLERS.items():
            n = max(1, int(events * share))
            results.append(measure(bench, database, handler, rounds, n))
            notes.append(f"{database}: {handler}: {rounds} rounds x {n} events per variant")
        return results
    finally:
        bench.close()


def run_sqlite(rounds: int, events: int, notes: list[str]) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="dbctx-bench-") as tmp:
        return run_database("SQLite", f"sqlite:///{tmp}/overhead.db", rounds, events, notes)


def run_postgres(rounds: int, events: int, notes: list[str]) -> list[Result]:
    admin = sa.create_engine(
        POSTGRES_URL, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 3}
    )
    safe_url = admin.url.render_as_string(hide_password=True)
    try:
        with admin.connect() as conn:
            version = conn.exec_driver_sql("SHOW server_version").scalar()
    except Exception as exc:
        admin.dispose()
        cause = getattr(exc, "orig", None) or exc  # the driver's error, without SQL noise
        first = (str(cause).strip().splitlines() or [""])[0]
        reason = f"PostgreSQL unreachable at {safe_url} ({type(cause).__name__}: {first})"
        return [Result("PostgreSQL", h, skipped=f"skipped: {reason}") for h in HANDLERS]
    notes.append(f"PostgreSQL: server {version} at {safe_url}")
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        return run_database("PostgreSQL", schema_url(POSTGRES_URL, schema), rounds, events, notes)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()
        notes.append(f"PostgreSQL: schema {schema} dropped")


# -- report -------------------------------------------------------------------------------


def library_state() -> str:
    """Where socketio_dbctx was imported from, and its git commit when it is a checkout."""
    import socketio_dbctx

    where = os.path.dirname(os.path.abspath(socketio_dbctx.__file__))
    try:
        git = ["git", "--no-optional-locks", "-C", where]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return where
    if not commit:
        return where
    changed = sum(1 for line in dirty if line.strip())
    return f"{where} at {commit}" + (f" + {changed} uncommitted file(s)" if changed else "")


def load_average() -> str:
    """The 1-minute load average: above the CPU count, other processes skew the numbers."""
    try:
        return f"load average {os.getloadavg()[0]:.2f}"
    except OSError:
        return "load average unknown"


def header(rounds: int, events: int) -> None:
    print("# socketio_dbctx per-event overhead\n")
    print(f"- Python {platform.python_version()} ({platform.python_implementation()})")
    machine = f"machine {platform.machine()}; {os.cpu_count()} CPUs"
    print(f"- platform: {platform.platform()}; {machine}; {load_average()} at the start")
    print(f"- SQLite library {sqlite3.sqlite_version}")
    print(f"- packages: {package_versions(PACKAGES)}")
    print(f"- socketio_dbctx source: {library_state()}")
    print(
        f"- method: Flask-SocketIO test client, one thread, async_mode=threading; "
        f"{rounds} interleaved A/B rounds; --events {events} (no-op: all, PK lookup: half)"
    )
    print(
        "- plain: flask_socketio.Namespace in an app without socketio_dbctx; dbctx: "
        "DBContextNamespace in an app with DBContext(app, socketio, db), default settings; "
        "same database, same handlers; µs/event = median over rounds; ratio and added µs "
        "= median of the per-round values"
    )
    print()


def table(results: list[Result]) -> None:
    print(
        "| database | handler | plain µs/event | dbctx µs/event | ratio (median of rounds) "
        "| added µs | target | pass |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        target = HANDLERS[r.handler][0]
        if r.skipped:
            print(f"| {r.database} | {r.handler} | {r.skipped} | | | | <= {target:.2f}x | |")
            continue
        plain, ours = statistics.median(r.plain), statistics.median(r.ours)
        ratio, added = statistics.median(r.ratios), statistics.median(r.added)
        verdict = "yes" if ratio <= target else "**no**"
        print(
            f"| {r.database} | {r.handler} | {plain:.1f} | {ours:.1f} | {ratio:.3f}x "
            f"| {added:+.1f} | <= {target:.2f}x | {verdict} |"
        )
    print()
    for r in results:
        if not r.skipped:
            ratios = r.ratios
            print(
                f"- {r.database} {r.handler}: round ratios {min(ratios):.3f}..{max(ratios):.3f}; "
                f"plain {min(r.plain):.1f}..{max(r.plain):.1f} µs, "
                f"dbctx {min(r.ours):.1f}..{max(r.ours):.1f} µs"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 15)")
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="no-op events per variant per round; the PK lookup runs half (default 2000)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 rounds, 400 events")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 15)
    events = args.events if args.events is not None else (400 if args.quick else 2000)
    if rounds < 1 or events < 1:
        parser.error("--rounds and --events must be >= 1")

    header(rounds, events)
    started = time.perf_counter()
    notes: list[str] = []
    results: list[Result] = []
    for name, runner in (("SQLite", run_sqlite), ("PostgreSQL", run_postgres)):
        try:
            results.extend(runner(rounds, events, notes))
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            reason = " ".join(f"failed: {type(exc).__name__}: {exc}".split())
            results.extend(Result(name, h, skipped=reason) for h in HANDLERS)
    table(results)
    for note in notes:
        print(f"- {note}")
    print(f"\ntotal time {time.perf_counter() - started:.1f} s; {load_average()} at the end")
    return 0


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exc:  # argparse errors and --help
        if exc.code not in (0, None):
            print(f"overhead.py: exit code {exc.code} suppressed", file=sys.stderr)
    sys.exit(0)
