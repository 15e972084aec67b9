"""Recovery figures: what database faults cost the clients of a real server.

One real server process (``tests.servers.app --extra tests.servers.faults``, eventlet
by default) reaches PostgreSQL through ``tests/tcp_proxy.py``; real python-socketio
clients (WebSocket) call ``/f:write``, which inserts one row. Three faults:

1. **Backends killed.** The pool is warm (every pooled connection open and idle, no
   pre-ping); every one of its backends is killed with ``pg_terminate_backend``. Then
   every client sends events at once. Reported: events that failed (the goal is 0),
   the time from the kill to the first successful ack, and the retries it took.
2. **Database down** (the proxy refuses connections) and **database hung** (the proxy
   accepts connections and never answers; only ``connect_timeout`` ends a connect):
   the time each call takes to be acked ``db_unavailable``, p50 and max, and how many
   got no ack within ``--hang-timeout``.
3. **Database back.** The proxy forwards again; one client calls in a loop. Reported:
   the time from the restore to the first successful ack, without restarting the app.

Run from the repository root::

    python benchmarks/faults.py [--async-mode eventlet|gevent|threading] [--rounds 5]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``); the benchmark works in a
schema of its own, dropped at the end. The exit code is 0 when the run completed
(the table tells the story), 2 when it could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import socketio
import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from _harness import BenchServer, package_versions  # noqa: E402

from tests.tcp_proxy import TcpProxy  # noqa: E402

POSTGRES_URL = os.environ.get(
    "DBCTX_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
NS = "/f"
POOL_SIZE = 5
POOL_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2
PACKAGES = (
    "Flask-SocketIO",
    "Flask-SQLAlchemy",
    "SQLAlchemy",
    "python-socketio",
    "psycopg2-binary",
    "eventlet",
    "gevent",
    "tenacity",
)


class BenchError(Exception):
    """The benchmark could not run (no database, the server did not start, ...)."""


# -- infrastructure ----------------------------------------------------------------------


def schema_url(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


class Server(BenchServer):
    """``python -m tests.servers.app`` with the fault handlers, through the proxy."""

    def __init__(self, async_mode: str, database_url: str, app_name: str, log: Path) -> None:
        options = {
            "pool_size": POOL_SIZE,
            "max_overflow": 0,
            "pool_timeout": POOL_TIMEOUT,
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT, "application_name": app_name},
        }
        try:
            super().__init__(
                database_url,
                async_mode=async_mode,
                extra=["tests.servers.faults"],
                log_path=log,
                log_level="INFO",
                config={"SQLALCHEMY_ENGINE_OPTIONS": options},
            )
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None

    def retries(self) -> int:
        events = self.json("/f/metrics")["events"]
        return int(events.get(f"{NS}:write", {}).get("retries", 0))


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Call:
    ack: Any
    started: float
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        return isinstance(self.ack, dict) and "id" in self.ack

    @property
    def unavailable(self) -> bool:
        return isinstance(self.ack, dict) and self.ack.get("error") == "db_unavailable"


NO_ACK = "<no ack>"


def write(client: socketio.Client, timeout: float) -> Call:
    started = time.monotonic()
    try:
        ack = client.call("write", uuid.uuid4().hex, namespace=NS, timeout=timeout)
    except socketio.exceptions.TimeoutError:
        ack = NO_ACK
    return Call(ack, started, time.monotonic())


def write_all(clients: Sequence[socketio.Client], per_client: int, timeout: float) -> list[Call]:
    """Every client sends ``per_client`` writes back to back, all clients at once."""
    barrier = threading.Barrier(len(clients))

    def run(client: socketio.Client) -> list[Call]:
        barrier.wait(30)
        return [write(client, timeout) for _ in range(per_client)]

    with ThreadPoolExecutor(len(clients)) as pool:
        return [call for calls in pool.map(run, clients) for call in calls]


def first_success(client: socketio.Client, since: float, limit: float) -> tuple[float, int]:
    """Call until an ack is a success; (seconds from ``since``, failed calls before)."""
    failed = 0
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        call = write(client, timeout=limit)
        if call.ok:
            return call.ended - since, failed
        failed += 1
    raise BenchError(f"no successful call within {limit}s")


# -- the scenarios -----------------------------------------------------------------------


@dataclass
class Figures:
    kill_events: int = 0
    kill_failed: int = 0
    kill_first_ok: list[float] = field(default_factory=list)
    kill_all_ok: list[float] = field(default_factory=list)
    kill_retries: int = 0
    outages: dict[str, list[Call]] = field(default_factory=dict)
    recovery: dict[str, tuple[float, int]] = field(default_factory=dict)


def backends(admin: sa.Engine, app_name: str) -> list[int]:
    with admin.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :n"),
                {"n": app_name},
            ).scalars()
        )


def warm(server: Server, clients: Sequence[socketio.Client], admin: sa.Engine, name: str) -> None:
    """Open every pooled connection (held at once), then let them go back idle."""

    def held() -> bool:
        with ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(lambda c: c.call("hold", 0.2, namespace=NS, timeout=30), clients))
        return len(backends(admin, name)) >= POOL_SIZE

    wait_until(held, 30, f"{POOL_SIZE} pooled connections")
    wait_until(lambda: server.checked_out() == 0, 10, "the pool to be idle")


def kill_round(
    server: Server,
    clients: Sequence[socketio.Client],
    admin: sa.Engine,
    app_name: str,
    per_client: int,
    figures: Figures,
) -> None:
    warm(server, clients, admin, app_name)
    pids = backends(admin, app_name)
    with admin.connect() as conn:
        for pid in pids:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    wait_until(lambda: not set(backends(admin, app_name)) & set(pids), 10, "backends to exit")
    retries_before = server.retries()
    killed = time.monotonic()
    calls = write_all(clients, per_client, timeout=30)
    figures.kill_events += len(calls)
    figures.kill_failed += sum(not call.ok for call in calls)
    done = [call.ended - killed for call in calls if call.ok]
    if done:
        figures.kill_first_ok.append(min(done))
        figures.kill_all_ok.append(max(done))
    figures.kill_retries += server.retries() - retries_before


def outage(
    how: str,
    server: Server,
    clients: Sequence[socketio.Client],
    proxy: TcpProxy,
    per_client: int,
    hang_timeout: float,
    figures: Figures,
) -> None:
    wait_until(lambda: write(clients[0], 30).ok, 30, "a successful call before the outage")
    if how == "down":
        proxy.cut()
    else:
        proxy.blackhole()
    # at most POOL_SIZE at once, so no call waits for a connection slot
    callers = list(clients[: max(1, min(len(clients), POOL_SIZE - 1))])
    figures.outages[how] = write_all(callers, per_client, timeout=hang_timeout)
    restored = time.monotonic()
    proxy.restore()
    figures.recovery[how] = first_success(clients[0], restored, 60)
    wait_until(lambda: server.checked_out() == 0, 60, "the pool to be idle after the outage")


# -- report ------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def spread(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return f"{ms(statistics.median(values))} / {ms(max(values))}"


def report(figures: Figures, args: argparse.Namespace) -> None:
    print("| fault | measure | result |")
    print("|---|---|---:|")
    rounds = len(figures.kill_first_ok)
    print(
        f"| every pooled backend killed ({POOL_SIZE} of {POOL_SIZE}, pool warm), "
        f"{args.rounds} rounds | events failed | **{figures.kill_failed}** of "
        f"{figures.kill_events} |"
    )
    print(
        f"| | time from the kill to the first success, p50 / max over {rounds} rounds "
        f"| {spread(figures.kill_first_ok)} |"
    )
    print(
        f"| | time from the kill until all {args.clients} x {args.per_client} events "
        f"succeeded, p50 / max | {spread(figures.kill_all_ok)} |"
    )
    print(f"| | retries (dbctx metrics) | {figures.kill_retries} |")
    labels = {
        "down": "database down (proxy refuses connections)",
        "hung": "database hung (proxy accepts, never answers)",
    }
    for how, calls in figures.outages.items():
        unavailable = [c.seconds for c in calls if c.unavailable]
        retryable = sum(bool(c.unavailable and c.ack.get("retryable")) for c in calls)
        missing = sum(c.ack == NO_ACK for c in calls)
        other = sorted(
            {
                json.dumps(c.ack, sort_keys=True)
                for c in calls
                if c.ack != NO_ACK and not c.unavailable
            }
        )
        print(
            f"| {labels[how]} | time to a `db_unavailable` ack, p50 / max "
            f"({len(unavailable)} of {len(calls)} calls) | {spread(unavailable)} |"
        )
        print(f"| | acks with `retryable: true` | {retryable} of {len(calls)} |")
        print(
            f"| | calls with no ack within {args.hang_timeout:g} s | "
            f"{'**' + str(missing) + '**' if missing else 0} |"
        )
        if other:
            count = len(calls) - len(unavailable) - missing
            print(f"| | other acks | {count}: {' '.join(f'`{a}`' for a in other)} |")
        seconds, failed = figures.recovery[how]
        print(
            f"| database back (after {how}) | time from the restore to the first success "
            f"(same process) | {ms(seconds)} ({failed} failed call(s) before) |"
        )
    print()


def header(args: argparse.Namespace) -> None:
    print(f"# socketio_dbctx recovery figures ({args.async_mode})\n")
    try:
        load = f"load average {os.getloadavg()[0]:.2f}"
    except OSError:
        load = "load average unknown"
    print(f"- Python {platform.python_version()}; {os.cpu_count()} CPUs; {load} at the start")
    print(f"- packages: {package_versions(PACKAGES)}")
    print(
        f"- server: tests.servers.app --async-mode {args.async_mode}, pool_size={POOL_SIZE}, "
        f"max_overflow=0, pool_timeout={POOL_TIMEOUT:g} s, connect_timeout={CONNECT_TIMEOUT} s, "
        f"pool_pre_ping off; default retry settings (DBCTX_MAX_RETRIES=2, "
        f"DBCTX_RETRY_DELAY=0.05, DBCTX_RETRY_MAX_DELAY=2.0)"
    )
    print(
        f"- clients: {args.clients} python-socketio clients over WebSocket; PostgreSQL "
        f"through tests/tcp_proxy.py"
    )
    print()


def run(args: argparse.Namespace) -> Figures:
    admin = sa.create_engine(
        POSTGRES_URL, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 3}
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        raise BenchError(f"PostgreSQL unreachable: {type(exc).__name__}") from exc
    url = sa.engine.make_url(POSTGRES_URL)
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    app_name = f"faults-bench-{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    figures = Figures()
    clients: list[socketio.Client] = []
    server: Server | None = None
    try:
        with contextlib.ExitStack() as stack:
            proxy = stack.enter_context(TcpProxy(url.host or "127.0.0.1", url.port or 5432))
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="dbctx-faults-"))
            proxied = url.set(host="127.0.0.1", port=proxy.port).update_query_dict(
                {"sslmode": "disable"}
            )
            database_url = schema_url(proxied.render_as_string(hide_password=False), schema)
            server = Server(args.async_mode, database_url, app_name, Path(tmp) / "server.log")
            try:
                for _ in range(args.clients):
                    client = socketio.Client(reconnection=False)
                    client.connect(server.url, namespaces=[NS], transports=["websocket"])
                    clients.append(client)
                for _ in range(args.rounds):
                    kill_round(server, clients, admin, app_name, args.per_client, figures)
                for how in ("down", "hung"):
                    outage(how, server, clients, proxy, 2, args.hang_timeout, figures)
            except BaseException:
                print(f"--- server log ---\n{server.log()[-3000:]}", file=sys.stderr)
                raise
            finally:
                for client in clients:
                    if client.connected:
                        client.disconnect()
                server.stop()
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--async-mode", choices=["eventlet", "gevent", "threading"], default="eventlet"
    )
    parser.add_argument("--rounds", type=int, default=5, help="backend-kill rounds (default 5)")
    parser.add_argument("--clients", type=int, default=5, help="Socket.IO clients (default 5)")
    parser.add_argument(
        "--per-client", type=int, default=4, help="writes per client per kill round (default 4)"
    )
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=15.0,
        help="seconds a call may wait for its ack during an outage (default 15)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.clients < 1 or args.per_client < 1 or args.hang_timeout <= 0:
        parser.error("--rounds, --clients and --per-client must be >= 1, --hang-timeout > 0")
    header(args)
    started = time.perf_counter()
    try:
        figures = run(args)
    except BenchError as exc:
        print(f"could not run: {exc}", file=sys.stderr)
        return 2
    report(figures, args)
    print(f"total time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
