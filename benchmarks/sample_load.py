"""The sample app under the README's load: 20 clients x 5 events/s on one worker.

Starts ``python -m sample_app`` (its default async mode, threading) on PostgreSQL in
a schema of its own, and runs ``python -m sample_app.load --clients 20 --rate 5`` against
it in several ways, one after the other on a fresh schema each:

* ``driver now``: the load driver as shipped (an open loop: events go out on
  schedule; acks handled in the reader thread; 8 symbols);
* ``2 symbols``: the same on 2 books (more orders wait for the same book lock);
* ``old driver``: each client waits for its ack before its next event, and
  python-socketio's default client starts a thread for every message received
  (every client hears every broadcast), on 2 symbols: the driver as it was.

Reported per run: events offered and done per second, late cancels, errors, latency
p50/p99 seen by the clients (all events, and ``place_order``), the server's own
``place_order`` p50/p99 (``get_status``: the handler, without the network and the
client), the peak connections in use and events waiting (the monitor's 1 s pushes),
and the CPU seconds of the server.

Target (issue 15): >= 95 events/s of 100 offered, p99 <= 100 ms.

Run from the repository root::

    python benchmarks/sample_load.py [--duration 30] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL``. This reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import socketio
from _harness import cpu_seconds, environment, positive_float, postgres_schema, table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sample_app.process import SampleAppProcess  # noqa: E402

TOKEN = "sample-load-benchmark"
CLIENTS, RATE = 20, 5.0
RUNS: list[tuple[str, list[str]]] = [
    ("driver now (8 symbols)", []),
    ("driver now, 2 symbols", ["--symbols", "BTC.USD,ETH.USD"]),
    (
        "old driver (closed loop, thread per message, 2 symbols)",
        ["--closed-loop", "--thread-per-message", "--symbols", "BTC.USD,ETH.USD"],
    ),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=positive_float, default=30.0, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="10 s per run")
    parser.add_argument("--only-first", action="store_true", help="just the shipped driver")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 10.0
    return args


def one_run(duration: float, extra: list[str], log: Path) -> dict[str, Any]:
    with postgres_schema() as url:
        app = SampleAppProcess(url, token=TOKEN, async_mode=None, log_path=log)
        with app:
            assert app.proc is not None
            server_cpu = cpu_seconds(app.proc.pid)
            peaks = {"checked_out": 0, "waiting": 0}
            monitor = socketio.Client(reconnection=False)

            @monitor.on("pool_status", namespace="/monitor")
            def pool_status(status: dict[str, Any]) -> None:
                pool = status["pools"]["default"]
                for key in peaks:
                    peaks[key] = max(peaks[key], pool[key])

            monitor.connect(app.url, namespaces=["/monitor"], auth={"token": TOKEN})
            started = time.monotonic()
            driver = subprocess.run(
                [sys.executable, "-m", "sample_app.load", "--url", app.url,
                 "--clients", str(CLIENTS), "--rate", str(RATE), "--duration", str(duration),
                 "--seed", "15", f"--token={TOKEN}", "--json", *extra],
                cwd=ROOT, capture_output=True, text=True, timeout=duration + 120,
            )  # fmt: skip
            server_cpu = cpu_seconds(app.proc.pid) - server_cpu
            monitor.disconnect()
        wall = time.monotonic() - started
    if driver.returncode not in (0, 1):
        raise SystemExit(f"the load driver failed:\n{driver.stdout}\n{driver.stderr}")
    summary: dict[str, Any] = json.loads(driver.stdout)
    summary["server_cpu_s"] = server_cpu
    summary["peaks"] = peaks
    summary["wall_s"] = wall
    return summary


def row(name: str, s: dict[str, Any]) -> list[Any]:
    place = s["by_event"].get("place_order", {})
    server = s.get("server", {}).get("events", {}).get("/trading:place_order", {})
    offered = CLIENTS * RATE
    return [
        name,
        f"{offered:.0f}",
        f"{s['events_per_s']:.1f}",
        s["late_cancels"],
        sum(s["errors"].values()),
        f"{s['p50_ms']:.1f}",
        f"{s['p99_ms']:.1f}",
        f"{place.get('p50_ms', 0):.1f} / {place.get('p99_ms', 0):.1f}",
        f"{server.get('p50_ms') or 0:.1f} / {server.get('p99_ms') or 0:.1f}",
        f"{s['peaks']['checked_out']} / {s['peaks']['waiting']}",
        f"{s['server_cpu_s']:.1f}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"# sample app: {CLIENTS} clients x {RATE:g} events/s, one worker, PostgreSQL\n")
    print(environment("threading (the sample's default)"))
    print(f"- {args.duration:g} s per run; a fresh schema per run\n")
    rows = []
    runs = RUNS[:1] if args.only_first else RUNS
    for name, extra in runs:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"sample_load_{os.getpid()}.log"
        rows.append(row(name, one_run(args.duration, extra, log)))
        print(f"done: {name}", file=sys.stderr, flush=True)
    print(
        table(
            ["run", "offered ev/s", "done ev/s", "late cancels", "errors", "p50 ms",
             "p99 ms", "place_order p50/p99 ms", "server place_order p50/p99 ms",
             "peak in use / waiting", "server CPU s"],
            rows,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
