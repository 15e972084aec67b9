"""Events per second with 1, 2 and 3 workers on one Redis message queue, side by side.

Each worker is a real server process (``python -m tests.servers.app``: a
``DBContextNamespace`` whose ``write`` handler inserts one row and acks its id) on
the same PostgreSQL schema and the same Redis message queue, with the ``/monitor``
namespace and so the cluster view switched on, as in production. Real
python-socketio clients over WebSocket, spread round-robin across the workers, each
call ``write`` back to back (one in flight per client) for a fixed time. The load
comes from ``--driver-procs`` separate processes, so the clients' own Python does not
share one GIL.

For each fleet size: warm up, count the acks completed inside the measured window,
then check that every acked row is stored and that every pool is back to 0 checked
out. Prints a Markdown table.

Run from the repository root::

    python benchmarks/workers.py [--workers 1,2,3] [--clients 12] [--duration 10]
        [--async-mode eventlet] [--pool-size 5] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``); the benchmark works in a
schema of its own, dropped at the end. Redis: ``DBCTX_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``); the cluster keys go to database ``--redis-db``
(default 14), emptied before each run. The exit code is 0 unless a run failed its
checks: this reports, it does not gate on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from _harness import BenchServer, package_versions

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get(
    "DBCTX_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DBCTX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MONITOR_TOKEN = "benchmark-token"
NAMESPACE = "/t"
LOCK_KEY = "socketio_dbctx_tests:cluster-lock"  # tests/conftest.py CLUSTER_LOCK_KEY
LOCK_SECONDS = 3600

PACKAGES = (
    "socketio-dbctx",
    "Flask-SocketIO",
    "python-socketio",
    "python-engineio",
    "SQLAlchemy",
    "redis",
    "eventlet",
    "gevent",
)


# -- the load driver (a subprocess: python benchmarks/workers.py --drive JSON) ---------------


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["clients"]`` clients until ``spec["end"]``; count acks in the window."""
    import socketio

    urls: list[str] = spec["urls"]
    window_start, window_end = spec["window"]
    lock = threading.Lock()
    result: dict[str, Any] = {"ok": 0, "errors": 0, "latencies_ms": [], "problems": []}
    connected: list[Any] = []

    def connect(index: int) -> Any:
        client = socketio.Client(reconnection=False)
        client.connect(
            urls[index % len(urls)],
            namespaces=[NAMESPACE],
            transports=["websocket"],
            wait_timeout=20,
        )
        return client

    def run(index: int, client: Any) -> None:
        while time.time() < spec["start"]:
            time.sleep(min(0.01, max(0.0, spec["start"] - time.time())))
        n = 0
        while True:
            sent = time.time()
            if sent >= window_end:
                return
            try:
                ack = client.call("write", f"c{index}-{n}", namespace=NAMESPACE, timeout=30)
                good = isinstance(ack, dict) and isinstance(ack.get("id"), int)
                problem = None if good else f"bad ack {ack!r}"
            except Exception as exc:
                good, problem = False, f"{type(exc).__name__}: {exc}"
            done = time.time()
            n += 1
            if window_start <= done <= window_end:
                with lock:
                    if good:
                        result["ok"] += 1
                        result["latencies_ms"].append((done - sent) * 1000)
                    else:
                        result["errors"] += 1
                        if len(result["problems"]) < 5:
                            result["problems"].append(problem)

    for index in spec["clients"]:
        connected.append((index, connect(index)))
    threads = [threading.Thread(target=run, args=item) for item in connected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _, client in connected:
        client.disconnect()
    return result


# -- the fleet ------------------------------------------------------------------------------


def start_worker(
    args: argparse.Namespace, database_url: str, queue: str, logdir: Path
) -> BenchServer:
    """A worker: ``python -m tests.servers.app`` on the message queue, with a monitor."""
    return BenchServer(
        database_url,
        async_mode=args.async_mode,
        extra=(),
        log_path=logdir / f"worker-{uuid.uuid4().hex[:8]}.log",
        pool_size=args.pool_size,
        max_overflow=0,
        message_queue=queue,
        config={"DBCTX_MONITOR_AUTH": MONITOR_TOKEN, "DBCTX_MONITOR_INTERVAL": 2.0},
    )


@dataclass
class Run:
    workers: int
    clients: int
    duration: float
    ok: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.duration

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def claim_redis_db() -> tuple[str, Any]:
    """A Redis URL on a database (15 down to 1) nobody else's cluster keys use, locked
    the way tests/conftest.py (cluster_redis) locks one; returns ``(url, release)``."""
    import redis

    parts = urlsplit(REDIS_URL)
    owner = uuid.uuid4().hex
    for index in range(15, 0, -1):
        url = urlunsplit((parts.scheme, parts.netloc, f"/{index}", "", ""))
        client = redis.Redis.from_url(url)
        if client.set(LOCK_KEY, owner, nx=True, ex=LOCK_SECONDS):

            def release(client: Any = client) -> None:
                if client.get(LOCK_KEY) == owner.encode():
                    client.delete(LOCK_KEY)
                client.close()

            return url, release
        client.close()
    raise RuntimeError("every Redis database 1-15 is locked by a cluster test or benchmark")


def clear_worker_keys(queue: str) -> None:
    import redis

    client = redis.Redis.from_url(queue)
    try:
        stale = list(client.scan_iter(match="socketio_dbctx:worker:*"))
        if stale:
            client.delete(*stale)
    finally:
        client.close()


def run_fleet(size: int, args: argparse.Namespace, schema: str, queue: str, logdir: Path) -> Run:
    import sqlalchemy as sa

    sep = "&" if "?" in POSTGRES_URL else "?"
    database_url = f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    clear_worker_keys(queue)
    engine = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    workers: list[BenchServer] = []
    try:
        for _ in range(size):  # one by one: the first creates the tables
            workers.append(start_worker(args, database_url, queue, logdir))
        start = time.time() + 2.0 + 0.3 * args.clients  # everyone connected by then
        window = (start + args.warmup, start + args.warmup + args.duration)
        procs = max(1, min(args.driver_procs, args.clients))
        drivers = []
        for p in range(procs):
            spec = {
                "urls": [w.url for w in workers],
                "clients": list(range(p, args.clients, procs)),
                "start": start,
                "window": window,
            }
            drivers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--drive", json.dumps(spec)],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        run = Run(size, args.clients, args.duration)
        for driver in drivers:
            out, _ = driver.communicate(timeout=args.warmup + args.duration + 120)
            if driver.returncode != 0:
                raise RuntimeError(f"a load driver failed with code {driver.returncode}")
            part = json.loads(out.strip().splitlines()[-1])
            run.ok += part["ok"]
            run.errors += part["errors"]
            run.latencies_ms += part["latencies_ms"]
            run.problems += part["problems"]
        # checks: every acked row stored, every connection back
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f'SELECT count(*) FROM "{schema}".items')).scalar_one()
        if rows < run.ok:
            raise RuntimeError(f"{run.ok} writes acked in the window but only {rows} rows stored")
        for worker in workers:
            deadline = time.monotonic() + 10
            while (held := worker.checked_out()) != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{worker.url}: {held} connections still checked out")
                time.sleep(0.1)
        return run
    finally:
        for worker in workers:
            worker.stop()
        clear_worker_keys(queue)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


def table(runs: list[Run]) -> str:
    """Markdown; the speed-up is against the first row."""
    base = runs[0].rate if runs and runs[0].ok else None
    lines = [
        "| workers | clients | events/s | per worker | speed-up | p50 ms | p95 ms | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        speedup = f"{run.rate / base:.2f}x" if base else "-"
        lines.append(
            f"| {run.workers} | {run.clients} | {run.rate:.0f} | {run.rate / run.workers:.0f} "
            f"| {speedup} | {run.percentile(0.5):.1f} | {run.percentile(0.95):.1f} "
            f"| {run.errors} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,3", help="fleet sizes, e.g. 1,2,3")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument(
        "--async-mode", choices=("threading", "eventlet", "gevent"), default="eventlet"
    )
    parser.add_argument("--pool-size", type=int, default=5, help="per worker (max_overflow 0)")
    parser.add_argument("--driver-procs", type=int, default=2, help="load driver processes")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 6 clients: a smoke test")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.clients = 3.0, 1.0, 6
    try:
        args.sizes = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers must be comma-separated numbers, got {args.workers!r}")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--workers sizes must be >= 1")
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.pool_size < 1:
        parser.error("--clients, --duration and --pool-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drive:
        print(json.dumps(drive(json.loads(args.drive))), flush=True)
        return 0
    queue, release = claim_redis_db()
    schema = f"bench_workers_{uuid.uuid4().hex[:8]}"
    print(
        f"# workers benchmark: {args.async_mode}, pool {args.pool_size}/0 per worker, "
        f"{args.clients} clients (round-robin, one call in flight each), "
        f"{args.duration:g} s measured after {args.warmup:g} s warm-up",
        flush=True,
    )
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}; {package_versions(PACKAGES)}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as logdir:
        try:
            runs, failed = measure(args, schema, queue, Path(logdir))
        finally:
            release()
    print()
    print(table(runs))
    return 1 if failed else 0


def measure(
    args: argparse.Namespace, schema: str, queue: str, logdir: Path
) -> tuple[list[Run], bool]:
    runs: list[Run] = []
    failed = False
    for size in args.sizes:
        try:
            run = run_fleet(size, args, schema, queue, logdir)
        except Exception as exc:
            failed = True
            print(f"# {size} worker(s): FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        runs.append(run)
        print(
            f"# {size} worker(s): {run.rate:.0f} events/s, {run.errors} errors "
            f"{run.problems[:2] if run.problems else ''}",
            flush=True,
        )
        failed = failed or bool(run.errors)
    return runs, failed


if __name__ == "__main__":
    sys.exit(main())
