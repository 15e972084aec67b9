"""Saturation: throughput against the pool's physical limit, ours vs a plain Namespace.

The handler holds its pooled connection for 20 ms (``SELECT pg_sleep(0.02)``) on a
PostgreSQL pool of 5 + 0, so no server can do more than 5 / 0.02 s = 250 events/s.
60 python-socketio clients (spread over several client processes, each client in its
own thread calling ``call()`` in a loop) keep it saturated for 10 s. Reported, for
``DBContextNamespace`` and for a plain ``flask_socketio.Namespace`` with the same
handler, in one run: done events/s and as a fraction of 250/s, p50/p99 latency of
done calls, errors (error acks, and calls never acked within 30 s), peak
``checked_out``, and the CPU used by the server and by the client processes (so a
client-bound run shows).

Targets for ours: >= 0.90 of the physical limit, 0 errors, p99 <= 1 s.

Run from the repository root::

    python benchmarks/saturation.py [--duration 10] [--clients 60] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``); the benchmark works in a
schema of its own, dropped at the end. The exit code is 0 when the run completed:
this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _harness import (
    BenchServer,
    environment,
    ms,
    percentile,
    positive_float,
    positive_int,
    postgres_schema,
    run_callers,
    table,
)

HOLD = 0.02
POOL = {"pool_size": 5, "max_overflow": 0}
LIMIT = POOL["pool_size"] / HOLD


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=positive_float, default=10.0, help="seconds")
    parser.add_argument("--clients", type=positive_int, default=60)
    parser.add_argument("--processes", type=positive_int, default=4, help="client processes")
    parser.add_argument("--pool-timeout", type=positive_float, default=30.0)
    parser.add_argument(
        "--async-mode", choices=["eventlet", "gevent", "threading"], default="eventlet"
    )
    parser.add_argument("--repeat", type=positive_int, default=1, help="runs per side")
    parser.add_argument("--quick", action="store_true", help="a 4 s run per side")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 4.0
    args.processes = min(args.processes, args.clients)
    return args


def measure(database_url: str, bare: bool, args: argparse.Namespace) -> dict[str, Any]:
    with BenchServer(
        database_url,
        async_mode=args.async_mode,
        bare=bare,
        pool_timeout=args.pool_timeout,
        **POOL,
    ) as server:
        server.reset()
        cpu_before = server.cpu()
        result, _ = run_callers(
            server.url,
            clients=args.clients,
            processes=args.processes,
            event="pg_sleep",
            args=[HOLD],
            expected=True,
            duration=args.duration,
        )
        server_cpu = server.cpu() - cpu_before
        stats = server.figures()
        timeouts_logged = server.log().count("QueuePool limit")
    rate = result.done_in_window / args.duration
    return {
        "rate": rate,
        "fraction": rate / LIMIT,
        "p50": percentile(result.latencies, 0.50),
        "p99": percentile(result.latencies, 0.99),
        "errors": result.errors,
        "failures": result.failures,
        "peak": stats["peak"],
        "timeouts_logged": timeouts_logged,
        "server_cpu": server_cpu,
        "client_cpu": result.cpu_seconds,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("# Saturation: a 5 + 0 pool, 20 ms per event\n")
    print(environment(args.async_mode))
    print(
        f"- {args.clients} clients in {args.processes} client processes, one call at a time "
        f"each, {args.duration:g} s per run; physical limit {LIMIT:.0f} events/s; "
        f"pool_timeout {args.pool_timeout:g} s; DBCTX_* defaults for ours\n"
    )
    rows = []
    with postgres_schema() as database_url:
        for _ in range(args.repeat):
            for name, bare in (("socketio_dbctx", False), ("plain Namespace", True)):
                started = time.monotonic()
                r = measure(database_url, bare, args)
                failures = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items()))
                rows.append(
                    [
                        name,
                        f"{r['rate']:.0f}",
                        f"{r['fraction']:.2f}",
                        ms(r["p50"]),
                        ms(r["p99"]),
                        f"{r['errors']}" + (f" ({failures})" if failures else ""),
                        r["timeouts_logged"],
                        r["peak"],
                        f"{r['server_cpu'] / args.duration:.0%}",
                        f"{r['client_cpu'] / args.duration:.0%}",
                        f"{time.monotonic() - started:.0f}",
                    ]
                )
    print(
        table(
            [
                "side",
                "done/s",
                "of 250/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "pool timeouts logged",
                "peak checked_out",
                "server CPU",
                "client CPU",
                "run s",
            ],
            rows,
        )
    )
    print(
        "\nCPU columns: CPU seconds per second of the measured window (100% = one core); "
        "client CPU is the sum over the client processes. Target for socketio_dbctx: "
        ">= 0.90 of the limit, 0 errors, p99 <= 1000 ms."
    )


if __name__ == "__main__":
    main()
