"""Per-event overhead of ``AsyncDBContextNamespace`` against a plain ``socketio.AsyncNamespace``.

One python-socketio ``AsyncServer`` (``benchmarks/aio_app.py``) serves both namespaces,
``/plain`` and ``/ours``, each on an ``AsyncEngine`` of its own over asyncpg (pool 5 + 0),
with the same handlers: ``noop`` (``return 1``) and ``pk`` (row 1 of ``bench_items`` by
primary key; the plain handler opens ``async with AsyncSession(engine)`` itself and does
not commit, as users write a read; a third row has it commit too, as ours always does).
Ours runs with the default settings: admission, metrics, retries, leak tracking, held
emits all on.

Two ways of driving events, both reported, each as interleaved A/B rounds (every round
times N events of the plain namespace and N of ours, alternating which goes first; the
table shows per-event medians over the rounds and the medians of the per-round ratios and
differences, which follow a machine's changing load better than the two medians do):

* **in-process**: the server is imported and fed Socket.IO packets through
  ``AsyncServer._handle_eio_message`` one event at a time, the ack packet caught where
  Engine.IO would send it. This is python-socketio's real path (packet decoding, the
  handler task, ``trigger_event``, the handler, the ack's encoding) without the
  transport, so the numbers measure Python and database work, not network noise;
* **end to end**: the same module under uvicorn, one python-socketio client over
  WebSocket calling one event at a time (``client.call``): what a client sees, the
  transport and the client's threads included.

Besides wall-clock time, each table shows CPU µs per event over all rounds (in-process:
the benchmark process; end to end: the uvicorn process, from ``/proc``, 10 ms ticks summed
over thousands of events): time spent waiting for PostgreSQL is not in it, and it moves
much less than wall-clock time when other processes share the machine.

Run from the repository root::

    python benchmarks/aio_overhead.py [--rounds 21] [--events 400] [--e2e-events 150] [--quick]

PostgreSQL: ``DBCTX_TEST_POSTGRES_URL`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``, used through asyncpg); the
benchmark works in a schema of its own, dropped at the end. The exit code is 0 when the
run completed: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, Callable

import socketio
import sqlalchemy as sa
from _harness import (
    HTTP,
    POSTGRES_URL,
    ROOT,
    cpu_seconds,
    environment,
    free_port,
    package_versions,
    positive_int,
    stop_process,
    table,
    wait_until,
)
from socketio import packet

#: Row label -> (plain event, our event).
HANDLERS = {
    "no-op": ("noop", "noop"),
    "PK lookup": ("pk", "pk"),
    "PK lookup, the plain handler commits too": ("pk_commit", "pk"),
}
EXPECTED = {"noop": 1, "pk": {"id": 1, "name": "one"}, "pk_commit": {"id": 1, "name": "one"}}
ASYNC_PACKAGES = ("asyncpg", "uvicorn", "tenacity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=21)
    parser.add_argument("--events", type=positive_int, default=400, help="per side and round")
    parser.add_argument(
        "--e2e-events", type=positive_int, default=150, help="per side and round, end to end"
    )
    parser.add_argument(
        "--warmup", type=positive_int, default=50, help="checked calls per side first"
    )
    parser.add_argument("--quick", action="store_true", help="3 short rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.events, args.e2e_events, args.warmup = 3, 100, 40, 10
    return args


# -- the database --------------------------------------------------------------------------


@contextmanager
def bench_schema() -> Iterator[dict[str, str]]:
    """A fresh schema holding ``bench_items`` row 1; yields the server's environment."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
            conn.exec_driver_sql(
                f'CREATE TABLE "{name}".bench_items (id int PRIMARY KEY, name varchar(50))'
            )
            conn.exec_driver_sql(f"INSERT INTO \"{name}\".bench_items VALUES (1, 'one')")
        url = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg", query={})
        yield {
            "AIO_BENCH_URL": url.render_as_string(hide_password=False),
            "AIO_BENCH_SCHEMA": name,
        }
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        engine.dispose()


# -- rounds ---------------------------------------------------------------------------------


def summarize(
    times: dict[str, list[float]], cpu: dict[str, list[float]], events: int
) -> dict[str, float]:
    """Per-event medians (µs), and the medians of the per-round ratios ours/plain and
    differences ours - plain (rounds are interleaved, so these two follow the load); and
    CPU µs per event over all rounds, with their ratio."""
    plain = [t / events * 1e6 for t in times["plain"]]
    ours = [t / events * 1e6 for t in times["ours"]]
    cpu_plain = sum(cpu["plain"]) / (events * len(cpu["plain"])) * 1e6
    cpu_ours = sum(cpu["ours"]) / (events * len(cpu["ours"])) * 1e6
    return {
        "plain": statistics.median(plain),
        "ours": statistics.median(ours),
        "ratio": statistics.median(o / p for o, p in zip(ours, plain)),
        "added": statistics.median(o - p for o, p in zip(ours, plain)),
        "cpu_plain": cpu_plain,
        "cpu_ours": cpu_ours,
        "cpu_ratio": cpu_ours / cpu_plain if cpu_plain else float("nan"),
    }


def row(label: str, figures: dict[str, float]) -> list[str]:
    return [
        label,
        f"{figures['plain']:.1f}",
        f"{figures['ours']:.1f}",
        f"{figures['ratio']:.3f}x",
        f"{figures['added']:+.1f}",
        f"{figures['cpu_plain']:.1f}",
        f"{figures['cpu_ours']:.1f}",
        f"{figures['cpu_ratio']:.3f}x",
    ]


HEADERS = [
    "handler",
    "plain µs/event",
    "dbctx µs/event",
    "ratio (median of rounds)",
    "added µs (median of rounds)",
    "plain CPU µs/event",
    "dbctx CPU µs/event",
    "CPU ratio",
]


# -- in-process -----------------------------------------------------------------------------


class Driver:
    """Feeds packets to an ``AsyncServer`` as Engine.IO would, and catches its acks."""

    def __init__(self, sio: socketio.AsyncServer) -> None:
        self.sio = sio
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        sio.eio.send = self._sent  # where the server's packets to the client go

    async def _sent(self, eio_sid: str, data: Any) -> None:
        pkt = self.sio.packet_class(encoded_packet=data)
        if pkt.packet_type == packet.ACK:
            self.waiting.pop(pkt.id).set_result(pkt.data)

    async def connect(self, namespace: str) -> str:
        eio_sid = uuid.uuid4().hex
        await self.sio._handle_eio_connect(eio_sid, {})
        connect = self.sio.packet_class(packet.CONNECT, namespace=namespace)
        await self.sio._handle_eio_message(eio_sid, connect.encode())
        return eio_sid

    async def call(self, eio_sid: str, namespace: str, event: str) -> Any:
        self.next_id += 1
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = ack
        pkt = self.sio.packet_class(
            packet.EVENT, data=[event], namespace=namespace, id=self.next_id
        )
        await self.sio._handle_eio_message(eio_sid, pkt.encode())
        (answer,) = await ack
        return answer


async def in_process(args: argparse.Namespace, server_env: dict[str, str]) -> list[list[str]]:
    os.environ.update(server_env)
    module = importlib.import_module("benchmarks.aio_app")
    driver = Driver(module.sio)
    sids = {side: await driver.connect(f"/{side}") for side in ("plain", "ours")}

    def caller(side: str, event: str) -> Callable[[], Awaitable[Any]]:
        return lambda: driver.call(sids[side], f"/{side}", event)

    rows = []
    for label, (plain_event, our_event) in HANDLERS.items():
        calls = {"plain": caller("plain", plain_event), "ours": caller("ours", our_event)}
        for side, event in (("plain", plain_event), ("ours", our_event)):  # hygiene, warm-up
            for _ in range(args.warmup):
                answer = await calls[side]()
                assert answer == EXPECTED[event], (side, event, answer)
        times: dict[str, list[float]] = {"plain": [], "ours": []}
        cpu: dict[str, list[float]] = {"plain": [], "ours": []}
        for number in range(args.rounds):
            order = ("plain", "ours") if number % 2 == 0 else ("ours", "plain")
            for side in order:
                call = calls[side]
                gc.collect()
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(args.events):
                    await call()
                times[side].append(time.perf_counter() - start)
                cpu[side].append(time.process_time() - cpu_start)
        rows.append(row(label, summarize(times, cpu, args.events)))
    for side, engine in module.ENGINES.items():
        left = engine.sync_engine.pool.checkedout()
        assert left == 0, f"{side}: {left} connection(s) still checked out"
        await engine.dispose()
    return rows


# -- end to end -----------------------------------------------------------------------------


def end_to_end(args: argparse.Namespace, server_env: dict[str, str]) -> list[list[str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **server_env,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "uvicorn", "benchmarks.aio_app:app", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*command, "--log-level", "warning", "--lifespan", "off"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: _answers(url, proc), 30, "the uvicorn server")
            rows = _drive(url, proc.pid, args)
            log.seek(0)
            problems = _problems(log.read().decode(errors="replace"))
            if problems:
                raise RuntimeError(f"the server logged problems: {problems}")
            return rows
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            stop_process(proc)


def _problems(text: str) -> list[str]:
    """Lines that say a session was not closed or something failed."""
    return [
        line
        for line in text.splitlines()
        if "garbage collector" in line or "Traceback" in line or "Warning" in line
    ]


def run_in_process(args: argparse.Namespace, server_env: dict[str, str]) -> list[list[str]]:
    """:func:`in_process`, failing on any warning it caused (SQLAlchemy warns when the
    garbage collector, not a close, returns a connection)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = asyncio.run(in_process(args, server_env))
    problems = [str(w.message) for w in caught]
    if problems:
        raise RuntimeError(f"warnings while driving in-process: {problems[:3]}")
    return rows


def _answers(url: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"the server exited with {proc.returncode}")
    try:
        with HTTP.open(url + "/state", timeout=5):
            return True
    except OSError:
        return False


def _drive(url: str, pid: int, args: argparse.Namespace) -> list[list[str]]:
    client = socketio.Client(reconnection=False)
    client.connect(url, namespaces=["/plain", "/ours"], transports=["websocket"], wait_timeout=10)
    rows = []
    try:
        for label, (plain_event, our_event) in HANDLERS.items():
            events = {"plain": plain_event, "ours": our_event}
            for side, event in events.items():
                for _ in range(args.warmup):
                    answer = client.call(event, namespace=f"/{side}", timeout=10)
                    assert answer == EXPECTED[event], (side, event, answer)
            times: dict[str, list[float]] = {"plain": [], "ours": []}
            cpu: dict[str, list[float]] = {"plain": [], "ours": []}
            for number in range(args.rounds):
                order = ("plain", "ours") if number % 2 == 0 else ("ours", "plain")
                for side in order:
                    event, namespace = events[side], f"/{side}"
                    start, cpu_start = time.perf_counter(), cpu_seconds(pid)
                    for _ in range(args.e2e_events):
                        client.call(event, namespace=namespace, timeout=10)
                    times[side].append(time.perf_counter() - start)
                    cpu[side].append(cpu_seconds(pid) - cpu_start)
            rows.append(row(label, summarize(times, cpu, args.e2e_events)))
    finally:
        client.disconnect()
    with HTTP.open(url + "/state", timeout=5) as response:
        left = json.loads(response.read())["checked_out"]
    assert left == {"plain": 0, "ours": 0}, f"connections still checked out: {left}"
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("# Per-event overhead: AsyncDBContextNamespace vs a plain socketio.AsyncNamespace\n")
    print(environment("asyncio (uvicorn for end to end)"))
    print(f"- and: {package_versions(ASYNC_PACKAGES)}")
    print(
        f"- asyncpg, pool 5 + 0 per side; {args.rounds} interleaved A/B rounds of "
        f"{args.events} events per side in-process, {args.e2e_events} end to end; "
        "DBCTX_* defaults for ours\n"
    )
    with bench_schema() as server_env:
        print("## In-process (python-socketio's dispatch, no transport)\n")
        print(table(HEADERS, run_in_process(args, server_env)))
        print("\n## End to end (uvicorn, one WebSocket client, one call at a time)\n")
        print(table(HEADERS, end_to_end(args, server_env)))
    print(
        "\nThe plain PK handler does not commit (closing its session rolls back); ours "
        "commits before the ack. The third row's plain handler commits too."
    )


if __name__ == "__main__":
    main()
