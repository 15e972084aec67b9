"""Saturation on asyncio: ``AsyncDBContextNamespace`` against a plain ``socketio.AsyncNamespace``.

python-socketio's ``AsyncServer`` under uvicorn (``benchmarks/aio_app.py``, one server
process per run), asyncpg, a pool of 5 + 0; every event holds its connection for 20 ms
(``SELECT pg_sleep(0.02)`` and a commit), so no server can do more than 5 / 0.02 s = 250
events/s. 60 python-socketio clients (spread over client processes, each client in its
own thread calling ``call()`` in a loop) keep it saturated.

Three runs, side by side: ours and the plain namespace with the same small
``pool_timeout`` (default 0.1 s: the 55 events beyond the pool wait about 0.2 s), then the
plain namespace with a ``pool_timeout`` of 30 s. Ours admits as many events as the pool
has connections and queues the rest (``DBCTX_QUEUE_TIMEOUT``, 10 s), so none waits in the
pool; the plain handler's events all wait in the pool's queue, and those past
``pool_timeout`` fail (its handler catches the error and acks ``pool_timeout``, so its
clients go on; an uncaught exception would send no ack at all).

Reported per run: done events/s and as a fraction of 250/s, p50/p99 latency of done
calls, errors by kind (error acks, calls not acked within 30 s), pool timeouts (the plain
handler's count; for ours, the server log's), peak ``checked_out``, and the CPU of the
server and of the client processes; and, first, the rate of a bare loop (5 asyncpg
connections doing ``pg_sleep(0.02)`` and a commit, no Socket.IO), which is what the
machine allows any server, with each run's rate as a fraction of it. Targets for ours:
>= 0.90 of 250/s, 0 errors.

Run from the repository root::

    python benchmarks/aio_saturation.py [--duration 10] [--clients 60] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``, used through asyncpg); a schema
of its own, dropped at the end. The exit code is 0 when the run completed: this reports,
it does not gate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from _harness import (
    HTTP,
    ROOT,
    cpu_seconds,
    environment,
    free_port,
    ms,
    package_versions,
    percentile,
    positive_float,
    positive_int,
    run_callers,
    stop_process,
    table,
    wait_until,
)
from aio_overhead import ASYNC_PACKAGES, bench_schema

HOLD = 0.02
POOL_SIZE = 5
LIMIT = POOL_SIZE / HOLD


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=positive_float, default=10.0, help="seconds")
    parser.add_argument("--clients", type=positive_int, default=60)
    parser.add_argument("--processes", type=positive_int, default=4, help="client processes")
    parser.add_argument(
        "--pool-timeout", type=positive_float, default=0.1, help="seconds, both sides"
    )
    parser.add_argument("--quick", action="store_true", help="a 2.5 s run per side")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 2.5
    args.processes = min(args.processes, args.clients)
    return args


class Server:
    """``uvicorn benchmarks.aio_app:app`` serving ``side`` at ``/l``."""

    def __init__(self, server_env: dict[str, str], side: str, pool_timeout: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            **server_env,
            "AIO_BENCH_SIDE": side,
            "AIO_BENCH_POOL": f"{POOL_SIZE},0,{pool_timeout}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.log_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "benchmarks.aio_app:app"),
                *("--port", str(self.port), "--log-level", "warning", "--lifespan", "off"),
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._answers, 30, "the uvicorn server")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            self.state()
            return True
        except OSError:
            return False

    def state(self, path: str = "/state") -> dict[str, Any]:
        with HTTP.open(self.url + path, timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read().decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log_file.close()


def bare_rate(server_env: dict[str, str], seconds: float) -> float:
    """Events/s of 5 asyncpg connections doing nothing but ``pg_sleep(0.02)`` and a
    commit in a loop: what this machine allows any server, before Socket.IO."""
    import asyncpg

    url = server_env["AIO_BENCH_URL"].replace("postgresql+asyncpg://", "postgresql://")

    async def loop(end_at: float) -> int:
        connection = await asyncpg.connect(url)
        done = 0
        try:
            while time.monotonic() < end_at:
                async with connection.transaction():
                    await connection.execute("SELECT pg_sleep($1)", HOLD)
                done += 1
        finally:
            await connection.close()
        return done

    async def all_loops() -> int:
        end_at = time.monotonic() + seconds
        return sum(await asyncio.gather(*(loop(end_at) for _ in range(POOL_SIZE))))

    return asyncio.run(all_loops()) / seconds


def measure(
    server_env: dict[str, str], side: str, pool_timeout: float, args: argparse.Namespace
) -> dict[str, Any]:
    server = Server(server_env, side, pool_timeout)
    try:
        server.state("/reset")
        cpu_before = cpu_seconds(server.proc.pid)
        result, _ = run_callers(
            server.url,
            clients=args.clients,
            processes=args.processes,
            event="pg_sleep",
            args=[HOLD],
            expected=True,
            duration=args.duration,
        )
        server_cpu = cpu_seconds(server.proc.pid) - cpu_before
        state = server.state()
        wait_until(lambda: server.state()["checked_out"][side] == 0, 10, "an idle pool")
        log = server.log()
    finally:
        server.stop()
    rate = result.done_in_window / args.duration
    return {
        "rate": rate,
        "fraction": rate / LIMIT,
        "p50": percentile(result.latencies, 0.50),
        "p99": percentile(result.latencies, 0.99),
        "errors": result.errors,
        "failures": result.failures,
        "pool_timeouts": state["pool_timeouts"][side] + log.count("QueuePool limit"),
        "peak": state["peak"][side],
        "server_cpu": server_cpu,
        "client_cpu": result.cpu_seconds,
    }


HEADERS = [
    "side",
    "pool_timeout s",
    "done/s",
    "of 250/s",
    "of bare loop",
    "p50 ms",
    "p99 ms",
    "errors",
    "pool timeouts",
    "peak checked_out",
    "server CPU",
    "client CPU",
]


def run(args: argparse.Namespace) -> tuple[float, list[dict[str, Any]]]:
    """The bare loop's rate and the three runs (each with its ``name`` and
    ``pool_timeout``)."""
    plan = [
        ("socketio_dbctx", "ours", args.pool_timeout),
        ("plain AsyncNamespace", "plain", args.pool_timeout),
        ("plain AsyncNamespace", "plain", 30.0),
    ]
    results = []
    with bench_schema() as server_env:
        bare = bare_rate(server_env, min(3.0, args.duration / 2))
        for name, side, pool_timeout in plan:
            figures = measure(server_env, side, pool_timeout, args)
            results.append({"name": name, "pool_timeout": pool_timeout, **figures})
    return bare, results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("# Saturation on asyncio: a 5 + 0 pool, 20 ms per event\n")
    print(environment("asyncio (uvicorn, one worker)"))
    print(f"- and: {package_versions(ASYNC_PACKAGES)}")
    print(
        f"- {args.clients} clients in {args.processes} client processes, one call at a time "
        f"each, {args.duration:g} s per run; physical limit {LIMIT:.0f} events/s; "
        "DBCTX_* defaults for ours\n"
    )
    rows = []
    bare, results = run(args)
    for r in results:
        failures = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items()))
        rows.append(
            [
                r["name"],
                f"{r['pool_timeout']:g}",
                f"{r['rate']:.0f}",
                f"{r['fraction']:.2f}",
                f"{r['rate'] / bare:.2f}",
                ms(r["p50"]),
                ms(r["p99"]),
                f"{r['errors']}" + (f" ({failures})" if failures else ""),
                r["pool_timeouts"],
                r["peak"],
                f"{r['server_cpu'] / args.duration:.0%}",
                f"{r['client_cpu'] / args.duration:.0%}",
            ]
        )
    print(table(HEADERS, rows))
    print(
        f"\nA bare loop (5 asyncpg connections, pg_sleep({HOLD}) and a commit, no Socket.IO) "
        f"does {bare:.0f} events/s here, {bare / LIMIT:.2f} of the limit: no server can beat it."
    )
    print(
        "\nCPU columns: CPU seconds per second of the measured window (100% = one core); "
        "client CPU is the sum over the client processes. Target for socketio_dbctx: "
        ">= 0.90 of the limit, 0 errors."
    )


if __name__ == "__main__":
    main()
