"""Per-event cost in CPU instructions: ``DBContextNamespace`` against a plain ``Namespace``.

Wall-clock overhead (``benchmarks/overhead.py``) moves with whatever else runs on the
machine; instruction counts do not. Each measurement is a child process of this script
under ``valgrind --tool=callgrind --separate-threads=yes`` that builds one app (Flask,
Flask-SQLAlchemy over a SQLite file in a temporary directory, Flask-SocketIO with
``async_mode="threading"``) with one namespace:

* plain: a ``flask_socketio.Namespace`` in an app without socketio_dbctx;
* dbctx: a ``DBContextNamespace`` in an app set up with ``DBContext(app, socketio, db)``,
  default settings (admission, metrics, retry and leak tracking on).

Both run the same handler (see ``HANDLERS``): ``noop`` returns 1, ``pk`` returns
``db.session.get(Item, 1)`` as a small dict. The child warms up, then drives N events
through the real dispatch path with Flask-SocketIO's test client on the main thread
(``client.emit(..., callback=True)`` -> ``trigger_event`` -> ``_handle_event`` ->
handler). Every (side, handler) pair runs twice, with N and with 2N events, and the
cost per event is ``(I(2N) - I(N)) / N``, where I is the main thread's total ``Ir``
(instructions executed) from callgrind: start-up, imports, set-up, warm-up and exit
are the same in both runs and cancel. Background threads (leak watchdog, ...) are in
other callgrind files and not counted.

``PYTHONHASHSEED=0`` in the children: hash randomisation alone moves a count by up to
20%; with it fixed, two runs agree to about 0.1%. After warm-up the child runs
``gc.collect(); gc.freeze()``, so a collection during the measured events scans only
what those events left behind, not the heap of imported modules. The child also sets
``sys.setswitchinterval(3600)``: background threads (engineio's service task, the leak
watchdog) wake on timers, and under valgrind, 50 times slower, each wake-up forces the
main thread to hand over the GIL; those hand-offs scale with wall time, so other load on
the machine moved a count by 6% in one run before. Now they happen only where the main thread
releases the GIL anyway (SQLite calls), and two runs agree whatever else runs.

Run from the repository root (needs ``valgrind``)::

    python benchmarks/instructions.py [--events 500] [--quick] [--jobs 2] [--handler all]

The exit code is 0 whether or not the targets are met (this reports, it does not
gate), 1 when a child failed or valgrind is missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
NAMESPACE = "/bench"
EVENT = "bench"
SIDES = ("plain", "dbctx")
CHILD_TIMEOUT = 1800.0
#: ``sys.setswitchinterval()`` in a child: far longer than a run.
SWITCH_INTERVAL = 3600.0


# -- handlers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    """What a handler may use: the Flask-SQLAlchemy instance and the ``Item`` model."""

    db: Any
    Item: Any


#: A handler: ``(namespace, models) -> ack``; the namespace is ``self`` of the event.
HandlerFunc = Callable[[Any, Models], Any]


def noop(namespace: Any, models: Models) -> Any:
    return 1


def pk_lookup(namespace: Any, models: Models) -> Any:
    item = models.db.session.get(models.Item, 1)
    return {"id": item.id, "name": item.name, "price": item.price}


def pk_lookup_and_commit(namespace: Any, models: Models) -> Any:
    """What a plain handler must do to match "committed before the ack"."""
    ack = pk_lookup(namespace, models)
    models.db.session.commit()
    return ack


def emit_to_self(namespace: Any, models: Models) -> Any:
    """One emit to the caller: sent at once (plain) or held until the commit (dbctx)."""
    from flask import request

    namespace.emit("tick", 1, room=request.sid)
    return 1


@dataclass(frozen=True)
class Handler:
    label: str
    plain: HandlerFunc
    dbctx: HandlerFunc
    target: float | None  # the ratio dbctx/plain of instructions per event to stay under


#: Name (``--handler``) -> the handler each side runs and the target. Add a case here.
HANDLERS: dict[str, Handler] = {
    "noop": Handler("no-op", noop, noop, 1.12),
    "pk": Handler("PK lookup", pk_lookup, pk_lookup, 1.04),
    # the same dbctx handler against a plain one that commits too: the pipeline's cost
    # without the COMMIT the plain side otherwise never pays
    "pk-commit": Handler("PK lookup (plain commits)", pk_lookup_and_commit, pk_lookup, None),
    # the cost of holding an emit until the commit (issue 12)
    "emit": Handler("emit to self", emit_to_self, emit_to_self, None),
}


# -- the child: one app, warm-up, N events -------------------------------------------------


def build(side: str, func: HandlerFunc, url: str) -> tuple[Any, Any]:
    """The app for ``side`` and a test client connected to its namespace."""
    from flask import Flask
    from flask_socketio import Namespace, SocketIO
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(f"instructions_{side}")
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    db = SQLAlchemy()
    db.init_app(app)

    from _harness import bench_item_model

    Item = bench_item_model(app, db)

    socketio = SocketIO(app, async_mode="threading")
    models = Models(db, Item)

    def on_bench(self: Any) -> Any:
        return func(self, models)

    if side == "plain":
        base: type = Namespace
    else:
        from socketio_dbctx import DBContext, DBContextNamespace

        DBContext(app, socketio, db)
        base = DBContextNamespace
    namespace_class = type(f"Bench_{side}", (base,), {"on_bench": on_bench})
    socketio.on_namespace(namespace_class(NAMESPACE))
    client = socketio.test_client(app, namespace=NAMESPACE)
    if not client.is_connected(NAMESPACE):
        raise RuntimeError(f"{side}: the test client could not connect to {NAMESPACE}")
    return app, client


def child(side: str, handler: str, events: int, warmup: int) -> dict[str, Any]:
    """Build the app, warm up, run ``events`` events; what the parent checks."""
    handlers = HANDLERS[handler]
    func = handlers.plain if side == "plain" else handlers.dbctx
    with tempfile.TemporaryDirectory(prefix="dbctx-instr-") as tmp:
        app, client = build(side, func, f"sqlite:///{tmp}/instructions.db")
        # No forced GIL hand-offs to background threads (see the module's docstring)
        sys.setswitchinterval(SWITCH_INTERVAL)
        emit = client.emit
        ack = emit(EVENT, namespace=NAMESPACE, callback=True)
        for _ in range(warmup):
            emit(EVENT, namespace=NAMESPACE, callback=True)
        gc.collect()
        gc.freeze()
        # -- the measured part: the only code whose count differs between N and 2N --
        for _ in range(events):
            emit(EVENT, namespace=NAMESPACE, callback=True)
        # ---------------------------------------------------------------------------
        last = emit(EVENT, namespace=NAMESPACE, callback=True)
        if last != ack:
            raise RuntimeError(f"{side} {handler}: ack changed from {ack!r} to {last!r}")
        db = app.extensions["sqlalchemy"]
        if db.session.registry.registry:
            raise RuntimeError(f"{side} {handler}: a session stayed in db.session's registry")
        client.disconnect(NAMESPACE)
        with app.app_context():
            db.engine.dispose()
    return {"side": side, "handler": handler, "events": events, "ack": ack}


# -- the parent: valgrind runs --------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    side: str
    handler: str
    events: int


@dataclass
class Outcome:
    run: Run
    instructions: int | None = None
    ack: Any = None
    error: str | None = None
    seconds: float = 0.0


_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def main_thread_instructions(out_file: Path) -> int:
    """The total ``Ir`` of thread 1 from a ``--separate-threads=yes`` callgrind run."""
    text = Path(f"{out_file}-01").read_text()
    found = _TOTAL.search(text)
    if found is None:
        raise RuntimeError(f"no summary/totals line in {out_file}-01")
    return int(found.group(1))


def valgrind_command(run: Run, out_file: Path, warmup: int) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={out_file}",
        sys.executable,
        str(SCRIPT),
        "--child",
        "--side",
        run.side,
        "--handler",
        run.handler,
        "--events",
        str(run.events),
        "--warmup",
        str(warmup),
    ]


def measure(run: Run, warmup: int, tmp: Path) -> Outcome:
    out_file = tmp / f"callgrind.{run.side}.{run.handler}.{run.events}"
    outcome = Outcome(run)
    began = time.perf_counter()
    output = ""
    try:
        proc = subprocess.run(
            valgrind_command(run, out_file, warmup),
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"exit code {proc.returncode}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError("the child printed no result")
        outcome.ack = json.loads(lines[-1])["ack"]
        outcome.instructions = main_thread_instructions(out_file)
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        print(f"{run}: {outcome.error}\n{output[-3000:]}", file=sys.stderr)
    outcome.seconds = time.perf_counter() - began
    return outcome


def measure_all(runs: list[Run], warmup: int, jobs: int, tmp: Path) -> dict[Run, Outcome]:
    """``runs`` under valgrind, ``jobs`` at a time."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(runs, pool.map(lambda run: measure(run, warmup, tmp), runs)))


def valgrind_version() -> str:
    try:
        return subprocess.run(
            ["valgrind", "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except OSError:
        return "unknown"


def library_state() -> str:
    """Where socketio_dbctx is imported from, with its git commit when it is a checkout."""
    import socketio_dbctx

    where = os.path.dirname(os.path.abspath(socketio_dbctx.__file__))
    commit = subprocess.run(
        ["git", "--no-optional-locks", "-C", where, "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return f"{where} at {commit}" if commit else where


def header(args: argparse.Namespace, warmup: int) -> None:
    from _harness import CORE_PACKAGES, package_versions

    print("# socketio_dbctx per-event cost in instructions\n")
    print(f"- Python {platform.python_version()} ({platform.python_implementation()})")
    print(f"- platform: {platform.platform()}; machine {platform.machine()}")
    print(f"- {valgrind_version()}; SQLite library {sqlite3.sqlite_version}")
    print(f"- packages: {package_versions(CORE_PACKAGES)}")
    print(f"- socketio_dbctx source: {library_state()}")
    print(f"- command: {shlex.join(['python', *sys.argv])}")
    example = valgrind_command(Run("dbctx", "pk", args.events), Path("OUT"), warmup)
    print(f"- each child: PYTHONHASHSEED=0 {shlex.join(example[:4])} python {SCRIPT.name} ...")
    print(
        f"- method: main thread's Ir for {args.events} and {2 * args.events} events after "
        f"{warmup} warm-up events, Flask-SocketIO test client, async_mode=threading, SQLite; "
        f"instr/event = (I(2N) - I(N)) / N; ratio = dbctx / plain"
    )
    print()


def per_event(outcomes: dict[Run, Outcome], side: str, handler: str, n: int) -> float | None:
    small, large = outcomes[Run(side, handler, n)], outcomes[Run(side, handler, 2 * n)]
    if small.instructions is None or large.instructions is None:
        return None
    return (large.instructions - small.instructions) / n


def report(outcomes: dict[Run, Outcome], handlers: list[str], n: int) -> bool:
    """Print the table; False when a row has no numbers."""
    complete = True
    print("| handler | plain instr/event | dbctx instr/event | ratio | added | target | pass |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in handlers:
        handler = HANDLERS[name]
        plain, ours = (per_event(outcomes, side, name, n) for side in SIDES)
        acks = {repr(o.ack) for o in outcomes.values() if o.run.handler == name}
        target = "-" if handler.target is None else f"<= {handler.target:.2f}x"
        if plain is None or ours is None:
            print(f"| {handler.label} | failed | | | | {target} | |")
            complete = False
            continue
        if len(acks) != 1:
            differ = ", ".join(sorted(acks))
            print(f"| {handler.label} | acks differ: {differ} | | | | {target} | |")
            complete = False
            continue
        ratio = ours / plain
        met = handler.target is None or ratio <= handler.target
        verdict = "-" if handler.target is None else ("yes" if met else "**no**")
        print(
            f"| {handler.label} | {plain:,.0f} | {ours:,.0f} | {ratio:.3f}x "
            f"| {ours - plain:+,.0f} | {target} | {verdict} |"
        )
    print()
    for outcome in outcomes.values():
        run = outcome.run
        count = "failed" if outcome.instructions is None else f"{outcome.instructions:,}"
        print(
            f"- {run.handler} {run.side} {run.events} events: main thread Ir {count} "
            f"({outcome.seconds:.0f} s)"
        )
    return complete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=None, help="N (default 500; quick 100)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="events before the measured ones (default 200)"
    )
    parser.add_argument("--quick", action="store_true", help="N = 100, 50 warm-up events")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind children at once (2)")
    parser.add_argument("--handler", choices=[*HANDLERS, "all"], default="all")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.events = args.events if args.events is not None else (100 if args.quick else 500)
    warmup = args.warmup if args.warmup is not None else (50 if args.quick else 200)
    if args.events < 1 or warmup < 0 or args.jobs < 1:
        parser.error("--events and --jobs must be >= 1, --warmup >= 0")

    if args.child:
        if args.side is None or args.handler == "all":
            parser.error("--child needs --side and one --handler")
        print(json.dumps(child(args.side, args.handler, args.events, warmup)), flush=True)
        return 0

    if shutil.which("valgrind") is None:
        print("instructions.py: valgrind is not installed (apt-get install valgrind)")
        return 1
    handlers = list(HANDLERS) if args.handler == "all" else [args.handler]
    header(args, warmup)
    runs = [
        Run(side, name, n)
        for name in handlers
        for side in SIDES
        for n in (args.events, 2 * args.events)
    ]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dbctx-callgrind-") as tmp:
        outcomes = measure_all(runs, warmup, args.jobs, Path(tmp))
    complete = report(outcomes, handlers, args.events)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s with --jobs {args.jobs}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
