"""Flood: what one flooding client does to everyone else's latency.

One client keeps 200 events in flight without waiting for acks (each holds a pooled
connection for 20 ms: ``SELECT pg_sleep(0.02)``; every ack is answered by a new
event) while 4 well-behaved clients call a quick handler (``SELECT 1``) one call at
a time, on a PostgreSQL pool of 5 + 0. Measured in one run, each on a fresh server:

* socketio_dbctx with ``DBCTX_MAX_IN_FLIGHT_PER_CLIENT=4`` (the default);
* socketio_dbctx with ``DBCTX_MAX_IN_FLIGHT_PER_CLIENT=0`` (no per-client limit; the
  process-wide cap of 5 still applies);
* a plain ``flask_socketio.Namespace`` with the same handlers.

Reported: the well-behaved clients' p50/p99/max latency and errors, and what the
flood got done. Target: well-behaved p99 < 100 ms with the per-client limit.

Run from the repository root::

    python benchmarks/flood.py [--duration 10] [--clients 4] [--outstanding 200] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``); the benchmark works in a
schema of its own, dropped at the end. The exit code is 0 when the run completed:
this reports, it does not gate.
"""

from __future__ import annotations

import argparse
from typing import Any

from _harness import (
    BenchServer,
    CallerResult,
    Flood,
    FloodResult,
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
#: name, bare (no socketio_dbctx at all), app.config
SIDES: list[tuple[str, bool, dict[str, Any]]] = [
    ("socketio_dbctx, per-client limit 4", False, {"DBCTX_MAX_IN_FLIGHT_PER_CLIENT": 4}),
    ("socketio_dbctx, no per-client limit", False, {"DBCTX_MAX_IN_FLIGHT_PER_CLIENT": 0}),
    ("plain Namespace", True, {}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=positive_float, default=10.0, help="seconds")
    parser.add_argument("--clients", type=positive_int, default=4, help="well-behaved clients")
    parser.add_argument("--outstanding", type=positive_int, default=200, help="flood in flight")
    parser.add_argument("--pool-timeout", type=positive_float, default=30.0)
    parser.add_argument(
        "--async-mode", choices=["eventlet", "gevent", "threading"], default="eventlet"
    )
    parser.add_argument("--quick", action="store_true", help="a 4 s run per side")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 4.0
    return args


def measure(
    database_url: str, bare: bool, config: dict[str, Any], args: argparse.Namespace
) -> tuple[CallerResult, FloodResult, int, int]:
    with BenchServer(
        database_url,
        async_mode=args.async_mode,
        bare=bare,
        pool_timeout=args.pool_timeout,
        config=config,
        **POOL,
    ) as server:
        good, flood = run_callers(
            server.url,
            clients=args.clients,
            processes=1,
            event="quick",
            args=[],
            expected=1,
            duration=args.duration,
            flood=Flood(args.outstanding, "pg_sleep", [HOLD], True),
        )
        timeouts_logged = server.log().count("QueuePool limit")
        peak = server.figures()["peak"]
    assert flood is not None
    return good, flood, timeouts_logged, peak


def describe(failures: dict[str, int]) -> str:
    total = sum(failures.values())
    detail = ", ".join(f"{kind} {count}" for kind, count in sorted(failures.items()))
    return f"{total}" + (f" ({detail})" if detail else "")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("# Flood: one client floods, the others call a quick handler\n")
    print(environment(args.async_mode))
    print(
        f"- pool 5 + 0, pool_timeout {args.pool_timeout:g} s; {args.clients} well-behaved "
        f"clients (one process); 1 flooding client (another process) keeping "
        f"{args.outstanding} events of {HOLD * 1000:.0f} ms in flight; {args.duration:g} s "
        "per side\n"
    )
    rows = []
    with postgres_schema() as database_url:
        for name, bare, config in SIDES:
            good, flood, timeouts_logged, peak = measure(database_url, bare, config, args)
            rows.append(
                [
                    name,
                    len(good.latencies),
                    ms(percentile(good.latencies, 0.50)),
                    ms(percentile(good.latencies, 0.99)),
                    ms(max(good.latencies, default=float("nan"))),
                    describe(good.failures),
                    f"{flood.done_in_window / args.duration:.0f}",
                    describe(flood.failures),
                    timeouts_logged,
                    peak,
                ]
            )
    print(
        table(
            [
                "side",
                "calls",
                "p50 ms",
                "p99 ms",
                "max ms",
                "errors",
                "flood done/s",
                "flood errors",
                "pool timeouts logged",
                "peak checked_out",
            ],
            rows,
        )
    )
    print(
        "\ncalls/p50/p99/max/errors: the well-behaved clients' quick calls. Target: p99 "
        "< 100 ms with the per-client limit."
    )


if __name__ == "__main__":
    main()
