"""Background streaming: per-client periodic database tasks, ours vs the naive loop.

Every connected client gets a background task that queries the database once a
second (``SELECT now()``) and emits the result to that client as ``tick``, on a
PostgreSQL pool of 5 + 0 with ``pool_timeout`` 3 s. 100 clients, measured for 15 s,
each side on a fresh server, in one run:

* socketio_dbctx: ``dbctx.start_periodic_task(tick, 1.0, sid)``: each run in its own
  scope, no connection held between runs;
* naive: ``socketio.start_background_task`` running
  ``with app.app_context(): while True: tick(sid); socketio.sleep(1)``: the usual
  workaround, one session (and connection) for the whole loop. A pool timeout in
  the loop is counted and the loop goes on.

Reported: peak and mean ``checked_out`` (exact peak from the pool's checkout event,
mean from sampling ``/_stats``), pool timeouts and other task errors, ticks the
clients received against the 1 per client per second expected, and how many clients
got none at all.

Run from the repository root::

    python benchmarks/background.py [--duration 15] [--clients 100] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``); the benchmark works in a
schema of its own, dropped at the end. The exit code is 0 when the run completed:
this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import socketio
from _harness import (
    NAMESPACE,
    BenchServer,
    connect,
    disconnect_all,
    environment,
    positive_float,
    positive_int,
    postgres_schema,
    table,
    wait_until,
)

POOL = {"pool_size": 5, "max_overflow": 0}
#: name, bare (no socketio_dbctx at all), LOAD_BACKGROUND
SIDES = [("socketio_dbctx start_periodic_task", False, "periodic"), ("naive loop", True, "naive")]
SAMPLE_EVERY = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=positive_float, default=15.0, help="seconds")
    parser.add_argument("--clients", type=positive_int, default=100)
    parser.add_argument("--interval", type=positive_float, default=1.0, help="seconds")
    parser.add_argument("--pool-timeout", type=positive_float, default=3.0)
    parser.add_argument(
        "--async-mode", choices=["eventlet", "gevent", "threading"], default="eventlet"
    )
    parser.add_argument("--quick", action="store_true", help="a 6 s run per side")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 6.0
    return args


class Ticks:
    """Ticks received, per client."""

    def __init__(self, clients: int) -> None:
        self.counts = [0] * clients
        self.lock = threading.Lock()

    def handler(self, index: int) -> Any:
        def on_tick(_: Any) -> None:
            with self.lock:
                self.counts[index] += 1

        return on_tick

    def snapshot(self) -> list[int]:
        with self.lock:
            return list(self.counts)


def measure(
    database_url: str, bare: bool, background: str, args: argparse.Namespace
) -> dict[str, Any]:
    ticks = Ticks(args.clients)
    with BenchServer(
        database_url,
        async_mode=args.async_mode,
        bare=bare,
        pool_timeout=args.pool_timeout,
        config={"LOAD_BACKGROUND": background, "LOAD_INTERVAL": args.interval},
        **POOL,
    ) as server:

        def join(index: int) -> socketio.Client:
            client = connect(server.url)
            client.on("tick", ticks.handler(index), namespace=NAMESPACE)
            return client

        with ThreadPoolExecutor(10) as pool:
            clients = list(pool.map(join, range(args.clients)))
        try:
            wait_until(lambda: server.figures()["tasks_started"] == args.clients, 30, "every task")
            time.sleep(args.interval)  # every task has had its first run
            server.reset()
            before = ticks.snapshot()
            samples = []
            end = time.monotonic() + args.duration
            while time.monotonic() < end:
                samples.append(server.checked_out())
                time.sleep(SAMPLE_EVERY)
            after = ticks.snapshot()
            stats = server.figures()
        finally:
            disconnect_all(clients)
    received = [b - a for a, b in zip(before, after)]
    expected = args.clients * args.duration / args.interval
    return {
        "peak": stats["peak"],
        "mean": statistics.fmean(samples),
        "pool_timeouts": stats["pool_timeouts"],
        "errors": stats["task_errors"],
        "runs": stats["task_runs"],
        "delivered": sum(received) / expected,
        "starved": sum(1 for n in received if n == 0),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("# Background streaming: one periodic database task per client\n")
    print(environment(args.async_mode))
    print(
        f"- pool 5 + 0, pool_timeout {args.pool_timeout:g} s; {args.clients} clients, one "
        f"task each every {args.interval:g} s; {args.duration:g} s measured per side\n"
    )
    rows = []
    with postgres_schema() as database_url:
        for name, bare, background in SIDES:
            r = measure(database_url, bare, background, args)
            rows.append(
                [
                    name,
                    r["peak"],
                    f"{r['mean']:.2f}",
                    r["pool_timeouts"],
                    r["errors"] - r["pool_timeouts"],
                    r["runs"],
                    f"{r['delivered']:.0%}",
                    r["starved"],
                ]
            )
    print(
        table(
            [
                "side",
                "peak checked_out",
                "mean checked_out",
                "pool timeouts",
                "other errors",
                "task runs",
                "ticks delivered",
                "clients with no tick",
            ],
            rows,
        )
    )
    print(
        "\nticks delivered: ticks the clients received during the window / (clients x "
        "window / interval)."
    )


if __name__ == "__main__":
    main()
