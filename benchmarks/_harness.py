"""Shared parts of the load benchmarks: servers, schemas, client processes, tables.

Each benchmark starts the tests' server, ``python -m tests.servers.app`` (for the load
benchmarks with ``--extra tests.servers.load``), on free ports, in a PostgreSQL schema
of its own (dropped at the end), and drives it with real python-socketio clients over
WebSocket. Nothing here imports eventlet or gevent: the benchmark process and its
client processes stay unpatched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import socketio
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.server_launch import HTTP, server_command, stop_process, wait_ready  # noqa: E402

POSTGRES_URL = os.environ.get(
    "DBCTX_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
#: The load handlers (``pg_sleep``, ``quick``, per-client background tasks, peaks).
LOAD = "tests.servers.load"
NAMESPACE = "/l"  # tests/servers/load.py's
START_TIMEOUT = 30.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: The stack every benchmark reports; each adds what else it runs on.
CORE_PACKAGES = (
    "socketio-dbctx",
    "Flask",
    "Flask-SocketIO",
    "Flask-SQLAlchemy",
    "SQLAlchemy",
    "python-socketio",
    "python-engineio",
    "Werkzeug",
)
PACKAGES = (*CORE_PACKAGES, "eventlet", "gevent", "psycopg2-binary")


# -- command line ---------------------------------------------------------------------------


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}")
    return value


# -- numbers ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: int = 1) -> str:
    """A Markdown table; columns from ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_item_model(app: Any, db: Any) -> Any:
    """The benchmarks' ``bench_item`` model on ``db``, its table created, item 1 in it."""
    import sqlalchemy as sa

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "bench_item"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(40), nullable=False)
        price = sa.Column(sa.Float, nullable=False)

    with app.app_context():
        db.create_all()
        if db.session.get(Item, 1) is None:
            db.session.add(Item(id=1, name="widget", price=9.5))
            db.session.commit()
    return Item


def package_versions(names: Sequence[str] = PACKAGES) -> str:
    """``"Flask 3.1.3, ..."`` for the installed ones of ``names``."""
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def environment(async_mode: str) -> str:
    """Markdown bullets describing where the numbers came from."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return "\n".join(
        [
            f"- Python {platform.python_version()}, {platform.platform()}, "
            f"{os.cpu_count()} CPU(s), load average {load} at the start",
            f"- server async mode: {async_mode}; PostgreSQL at {_safe_url(POSTGRES_URL)}",
            f"- packages: {package_versions()}",
        ]
    )


def _safe_url(url: str) -> str:
    parsed = sa.engine.make_url(url)
    return f"{parsed.host}:{parsed.port or 5432}/{parsed.database}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- PostgreSQL schema ------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema; yields the database URL whose search_path is that schema."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        sep = "&" if "?" in POSTGRES_URL else "?"
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{name}"
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        engine.dispose()


# -- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchServer:
    """A running ``python -m tests.servers.app``; stopped by :meth:`stop` (or the
    ``with`` block).

    :param bare: no socketio_dbctx at all (``--bare``): the plain side of a comparison.
    :param extra: ``--extra`` modules; by default :data:`LOAD`, its pool sampler off
        (it would cost both sides CPU that is not theirs).
    :param log_path: where the server's output goes; by default a temporary file.
    :param log_level: the server's logging level.
    :param options: more of :func:`tests.server_launch.server_command`'s keyword
        arguments (``pool_size``, ``pool_timeout``, ``config``, ``message_queue``, ...).
    :raises RuntimeError: when the server does not start.
    """

    def __init__(
        self,
        database_url: str,
        *,
        async_mode: str,
        bare: bool = False,
        extra: Sequence[str] = (LOAD,),
        log_path: Path | None = None,
        log_level: str = "WARNING",
        **options: Any,
    ) -> None:
        self.bare = bare
        self.async_mode = async_mode
        self._tmp = None
        if log_path is None:
            self._tmp = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log")  # noqa: SIM115
            log_path = Path(self._tmp.name)
        self.log_path = log_path
        if LOAD in extra:
            options["config"] = {"LOAD_SAMPLER": False, **options.get("config", {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = server_command(
            async_mode,
            self.port,
            database_url,
            bare=bare,
            extra=extra,
            log_level=log_level,
            **options,
        )
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        problem = wait_ready(self.proc, self.port, START_TIMEOUT)
        if problem:
            log = self.log()
            self.stop()
            raise RuntimeError(f"the benchmark server: {problem}\n{log[-4000:]}")

    def get(self, path: str, timeout: float = 10.0) -> str:
        with HTTP.open(self.url + path, timeout=timeout) as response:
            return str(response.read().decode())

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def stats(self) -> dict[str, Any]:
        """``/_stats``: the pool dict (None when bare), ``checked_out``, ..."""
        data: dict[str, Any] = self.json("/_stats")
        return data

    def checked_out(self) -> int:
        return int(self.stats()["checked_out"])

    def figures(self) -> dict[str, int]:
        """The load handlers' peaks and counters since the last :meth:`reset`."""
        data: dict[str, int] = self.json("/_load/peak")
        return data

    def reset(self) -> None:
        """Start the load figures afresh (the peak at what is checked out now)."""
        self.get("/_load/reset")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        if self._tmp is not None:
            self._tmp.close()

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- clients ------------------------------------------------------------------------------------


def connect(url: str, attempts: int = 5) -> socketio.Client:
    """A python-socketio client on ``/b`` over WebSocket (retried: the server may be busy)."""
    for attempt in range(attempts):
        client = socketio.Client(reconnection=False)
        try:
            client.connect(url, namespaces=[NAMESPACE], transports=["websocket"], wait_timeout=30)
            return client
        except socketio.exceptions.ConnectionError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def disconnect_all(clients: Sequence[socketio.Client]) -> None:
    """Disconnect in parallel: a WebSocket close waits for the server's close frame."""
    threads = [threading.Thread(target=c.disconnect) for c in clients if c.connected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


@dataclass
class CallerResult:
    """What one client process saw: latencies of done calls, and failures by kind."""

    latencies: list[float] = field(default_factory=list)
    done_in_window: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0

    def merge(self, other: CallerResult) -> None:
        self.latencies += other.latencies
        self.done_in_window += other.done_in_window
        self.cpu_seconds += other.cpu_seconds
        for kind, count in other.failures.items():
            self.failures[kind] = self.failures.get(kind, 0) + count

    @property
    def errors(self) -> int:
        return sum(self.failures.values())


def classify(ack: Any, expected: Any) -> str | None:
    """None for the expected ack; else the kind of failure."""
    if ack == expected:
        return None
    if isinstance(ack, dict) and "error" in ack:
        return str(ack["error"])
    return "unexpected_ack"


@dataclass
class FloodResult:
    """What the flooding client saw."""

    sent: int = 0
    done: int = 0
    done_in_window: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.failures.values())


@dataclass
class Flood:
    """One client that keeps ``outstanding`` events in flight without waiting for acks."""

    outstanding: int
    event: str
    args: list[Any]
    expected: Any


def _wait_start(go: Any, start_at: Any) -> float:
    go.wait()
    when = float(start_at.value)
    time.sleep(max(0.0, when - time.time()))
    return when


def _caller_process(
    url: str,
    clients: int,
    event: str,
    args: list[Any],
    expected: Any,
    duration: float,
    call_timeout: float,
    signals: tuple[Any, Any, Any, Any],
) -> None:
    """Body of a client process: ``clients`` clients, each calling ``event`` in a loop
    for ``duration`` seconds from the common start."""
    ready, go, start_value, results = signals
    connected = [connect(url) for _ in range(clients)]
    ready.put(len(connected))
    result = CallerResult()
    lock = threading.Lock()
    cpu_before = own_cpu_seconds()
    end_at = _wait_start(go, start_value) + duration

    def run(client: socketio.Client) -> None:
        mine = CallerResult()
        while time.time() < end_at:
            began = time.perf_counter()
            try:
                ack = client.call(event, tuple(args), namespace=NAMESPACE, timeout=call_timeout)
            except socketio.exceptions.TimeoutError:
                kind: str | None = "no_ack"
            else:
                kind = classify(ack, expected)
            elapsed = time.perf_counter() - began
            if kind is None:
                mine.latencies.append(elapsed)
                if time.time() <= end_at:
                    mine.done_in_window += 1
            else:
                mine.failures[kind] = mine.failures.get(kind, 0) + 1
        with lock:
            result.merge(mine)

    threads = [threading.Thread(target=run, args=(client,)) for client in connected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.cpu_seconds = own_cpu_seconds() - cpu_before
    disconnect_all(connected)
    results.put(result)


def _flood_process(
    url: str, flood: Flood, duration: float, call_timeout: float, signals: tuple[Any, ...]
) -> None:
    """Body of the flooding process: keep ``flood.outstanding`` events in flight."""
    ready, go, start_value, results = signals
    client = connect(url)
    ready.put(1)
    result = FloodResult()
    lock = threading.Lock()
    acked = threading.Condition(lock)
    pending = 0
    end_at = _wait_start(go, start_value) + duration

    def send() -> None:
        nonlocal pending
        result.sent += 1
        pending += 1
        client.emit(flood.event, tuple(flood.args), namespace=NAMESPACE, callback=on_ack)

    def on_ack(*ack_args: Any) -> None:
        nonlocal pending
        ack = ack_args[0] if len(ack_args) == 1 else list(ack_args)
        with lock:
            pending -= 1
            kind = classify(ack, flood.expected)
            in_window = time.time() < end_at
            if kind is None:
                result.done += 1
                result.done_in_window += in_window
            else:
                result.failures[kind] = result.failures.get(kind, 0) + 1
            if in_window:
                send()
            acked.notify_all()

    with lock:
        for _ in range(flood.outstanding):
            send()
    with lock:
        acked.wait_for(lambda: pending == 0, timeout=max(0.0, end_at - time.time()) + call_timeout)
        if pending:
            result.failures["no_ack"] = result.failures.get("no_ack", 0) + pending
    client.disconnect()
    results.put(result)


def run_callers(
    url: str,
    *,
    clients: int,
    processes: int,
    event: str,
    args: Sequence[Any],
    expected: Any,
    duration: float,
    call_timeout: float = 30.0,
    flood: Flood | None = None,
) -> tuple[CallerResult, FloodResult | None]:
    """``clients`` clients spread over ``processes`` processes, each calling ``event``
    one call at a time for ``duration`` seconds, all starting together; with
    ``flood``, one more process floods at the same time.

    :returns: the callers' merged result, and the flooder's.
    """
    context = multiprocessing.get_context("spawn")
    ready, go = context.Queue(), context.Event()
    start_value = context.Value("d", 0.0)
    results, flood_results = context.Queue(), context.Queue()
    base, extra = divmod(clients, processes)
    shares = [base + (1 if i < extra else 0) for i in range(processes)]
    workers = [
        context.Process(
            target=_caller_process,
            args=(url, share, event, list(args), expected, duration, call_timeout),
            kwargs={"signals": (ready, go, start_value, results)},
            daemon=True,
        )
        for share in shares
        if share
    ]
    callers = len(workers)
    if flood is not None:
        workers.append(
            context.Process(
                target=_flood_process,
                args=(url, flood, duration, call_timeout),
                kwargs={"signals": (ready, go, start_value, flood_results)},
                daemon=True,
            )
        )
    for worker in workers:
        worker.start()
    try:
        for _ in workers:  # every client connected before anyone starts
            ready.get(timeout=START_TIMEOUT + clients)
        start_value.value = time.time() + 0.5
        go.set()
        merged = CallerResult()
        for _ in range(callers):
            merged.merge(results.get(timeout=duration + call_timeout + 60))
        flooded = (
            flood_results.get(timeout=duration + call_timeout + 60) if flood is not None else None
        )
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.terminate()
    return merged, flooded
